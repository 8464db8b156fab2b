//! Session ids: `<instance>~<128 random bits, base64url>`. The instance prefix names the
//! gateway holding the session: instances of a cluster forward a session's requests to it
//! (`crate::cluster`, which takes addresses only from its peer list), and a load balancer may
//! route on it, with no shared state between gateways.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh id from the operating system's CSPRNG.
    pub fn generate(instance: &str) -> Self {
        let random = crate::relay::mask_keys::random_16();
        Self(format!("{instance}~{}", URL_SAFE_NO_PAD.encode(random)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form for logs: the instance and the first 4 characters of the random part, enough
    /// to correlate lines, far too little to use.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

/// Redacts any string given as a session id (it may not be one).
pub fn redact(id: &str) -> String {
    match id.split_once('~') {
        Some((instance, random)) => {
            let shown: String = random.chars().take(4).collect();
            format!("{instance}~{shown}…")
        }
        None => "(malformed)".to_owned(),
    }
}

/// Ids appear in logs only redacted, even through `{:?}`.
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_instance_and_128_random_bits() {
        let a = SessionId::generate("gw-1");
        let b = SessionId::generate("gw-1");
        assert_ne!(a, b);
        let (instance, random) = a.as_str().split_once('~').unwrap();
        assert_eq!(instance, "gw-1");
        assert_eq!(URL_SAFE_NO_PAD.decode(random).unwrap().len(), 16);
    }

    #[test]
    fn logs_never_see_the_whole_id() {
        let id = SessionId::generate("gw-1");
        let shown = format!("{id} {id:?}");
        assert!(!shown.contains(id.as_str()), "{shown}");
        assert!(shown.starts_with("gw-1~"));
        assert_eq!(redact("nonsense"), "(malformed)");
    }
}
