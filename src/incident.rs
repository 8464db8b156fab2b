//! What a client is told when the gateway fails to reach or hear from a backend: a generic
//! reason and a request id, never the backend's address or an OS error (those tell an outsider
//! the internal topology). The details go to the log, on a line carrying the same id, so an
//! operator can find them from what the client reports.

use crate::upstream::Refusal;

/// The header that repeats the id of a failed request.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";

/// A fresh id: 16 hex digits, random, so ids do not reveal request counts.
pub fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The client's answer for a backend failure with `status` (502, 503 or 504), naming `id`.
pub fn refusal(status: u16, id: &str) -> Refusal {
    let reason = match status {
        503 => "gateway out of resources, try again",
        504 => "the backend did not answer in time",
        _ => "the backend could not be reached or failed to answer",
    };
    let line = format!("{reason} (request id {id})");
    let mut extra = vec![(REQUEST_ID_HEADER, id)];
    if status == 503 {
        extra.push(("Retry-After", "1"));
    }
    Refusal::plain(status, &line, &extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_id_and_nothing_of_the_backend() {
        let id = request_id();
        assert_eq!(id.len(), 16);
        assert_ne!(id, request_id());
        for status in [502, 503, 504] {
            let refusal = refusal(status, &id);
            let body = String::from_utf8(refusal.body.clone()).unwrap();
            assert!(body.ends_with(&format!("(request id {id})\n")), "{body}");
            assert!(
                refusal
                    .headers
                    .iter()
                    .any(|(n, v)| n == REQUEST_ID_HEADER && v == id.as_bytes())
            );
            assert_eq!(refusal.status, status);
        }
    }
}
