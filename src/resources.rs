//! The process's own resources: how many descriptors it may open, how many client connections
//! fit in them, and telling the gateway's own exhaustion apart from a backend's failure.
//!
//! Every proxied connection holds two sockets (client and backend), so `max_connections` is
//! held to half of what the open-file limit leaves after a reserve. A gateway that accepted
//! more would hit EMFILE on backend connects, and turn its own exhaustion into errors that
//! look like the backends' fault.

use std::io;

/// Descriptors kept for everything that is not a proxied connection: listeners, the admin
/// listener and its clients, health probes, the runtime's own (epoll, eventfd, signal pipe),
/// files read at a reload, and a refused client briefly held while it is answered.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The open-file limit in force after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the soft one is often 1024, far below
/// the 9,000 connections of the default `max_connections`) and logs both. `None` where the
/// limit cannot be read; the gateway then runs with whatever it has.
pub fn raise_open_file_limit() -> Option<OpenFiles> {
    let (before, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!("cannot read the open-file limit: {error}");
            return None;
        }
    };
    let soft = if before < hard {
        match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!("cannot raise the open-file limit from {before} to {hard}: {error}");
                before
            }
        }
    } else {
        before
    };
    tracing::info!("open-file limit: soft {soft} (was {before}), hard {hard}");
    Some(OpenFiles { soft, hard })
}

/// How many proxied client connections fit in `open_files` descriptors: two sockets each,
/// after [`RESERVED_DESCRIPTORS`]; at least one, so a tiny limit still serves.
pub fn connection_capacity(open_files: u64) -> u32 {
    let pairs = open_files.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    u32::try_from(pairs).unwrap_or(u32::MAX).max(1)
}

/// `configured` (`limits.max_connections`) held to what the open-file limit can carry, with a
/// warning that says how to get the configured number when it is cut.
pub fn clamp_connections(configured: u32, open_files: Option<OpenFiles>) -> u32 {
    let Some(open_files) = open_files else {
        return configured;
    };
    let capacity = connection_capacity(open_files.soft);
    if configured <= capacity {
        return configured;
    }
    let needed = u64::from(configured) * 2 + RESERVED_DESCRIPTORS;
    tracing::warn!(
        "limits.max_connections is {configured}, which needs {needed} open files (two sockets \
         per connection and {RESERVED_DESCRIPTORS} in reserve), but the open-file limit is {}: \
         accepting at most {capacity} connections; raise the hard limit (ulimit -Hn, systemd \
         LimitNOFILE=) to allow more",
        open_files.soft
    );
    capacity
}

/// Whether `error` is the gateway running out of something of its own (descriptors, local
/// ports, kernel buffers, memory) rather than anything a peer did.
pub fn is_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_exhaustion_is_local_and_refusal_is_not() {
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_exhaustion(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ETIMEDOUT] {
            assert!(
                !is_exhaustion(&io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
        assert!(!is_exhaustion(&io::Error::other("no code")));
    }

    #[test]
    fn each_connection_needs_two_descriptors_after_the_reserve() {
        assert_eq!(connection_capacity(1024), 480);
        assert_eq!(connection_capacity(10), 1);
        let limit = Some(OpenFiles {
            soft: 1024,
            hard: 1024,
        });
        assert_eq!(clamp_connections(9_000, limit), 480);
        assert_eq!(clamp_connections(100, limit), 100);
        assert_eq!(clamp_connections(9_000, None), 9_000);
    }
}
