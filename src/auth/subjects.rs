//! Connections open per authenticated subject and route, against a route's
//! `auth.jwt.max_connections_per_subject`.
//!
//! Invariant: every count is held by exactly one [`SubjectSlot`], and an entry is in the map
//! only while it holds at least one, so the map's size is bounded by the open connections.

use dashmap::DashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct SubjectCounts {
    per_subject: DashMap<(Arc<str>, String), u32>,
}

impl SubjectCounts {
    /// Counts one more connection of `subject` on `route`; `None` when it holds `max` already.
    pub fn try_enter(
        self: &Arc<Self>,
        route: &Arc<str>,
        subject: &str,
        max: u32,
    ) -> Option<SubjectSlot> {
        let key = (Arc::clone(route), subject.to_owned());
        // The shard lock makes the check and the increment one step.
        let mut count = self.per_subject.entry(key.clone()).or_insert(0);
        if *count >= max {
            drop(count);
            self.per_subject.remove_if(&key, |_, count| *count == 0);
            return None;
        }
        *count += 1;
        Some(SubjectSlot {
            counts: Arc::clone(self),
            key,
        })
    }

    /// Connections `subject` holds on `route`.
    pub fn count(&self, route: &Arc<str>, subject: &str) -> u32 {
        self.per_subject
            .get(&(Arc::clone(route), subject.to_owned()))
            .map_or(0, |count| *count)
    }
}

/// One connection of a subject, uncounted when dropped.
#[derive(Debug)]
pub struct SubjectSlot {
    counts: Arc<SubjectCounts>,
    key: (Arc<str>, String),
}

impl Drop for SubjectSlot {
    fn drop(&mut self) {
        if let Some(mut count) = self.counts.per_subject.get_mut(&self.key) {
            *count = count.saturating_sub(1);
        }
        self.counts
            .per_subject
            .remove_if(&self.key, |_, count| *count == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_is_held_to_its_limit_and_freed_on_drop() {
        let counts = Arc::new(SubjectCounts::default());
        let route: Arc<str> = "chat".into();
        let a = counts.try_enter(&route, "alice", 2).unwrap();
        let _b = counts.try_enter(&route, "alice", 2).unwrap();
        assert!(counts.try_enter(&route, "alice", 2).is_none());
        assert!(counts.try_enter(&route, "bob", 2).is_some(), "per subject");
        let other: Arc<str> = "other".into();
        assert!(counts.try_enter(&other, "alice", 2).is_some(), "per route");
        drop(a);
        assert_eq!(counts.count(&route, "alice"), 1);
        assert!(counts.try_enter(&route, "alice", 2).is_some());
    }

    #[test]
    fn the_map_forgets_subjects_without_connections() {
        let counts = Arc::new(SubjectCounts::default());
        let route: Arc<str> = "chat".into();
        drop(counts.try_enter(&route, "alice", 1));
        assert!(counts.try_enter(&route, "bob", 0).is_none());
        assert!(counts.per_subject.is_empty());
    }
}
