//! The chat wire format: one JSON object per WebSocket text message, discriminated by `"type"`.
//!
//! Invariant: every event the server sends carries `"server": <instance name>`, so a client can
//! tell which instance holds a room. Names that reach room state have passed [`valid_room`] or
//! [`clean_user`], so a peer can never make the server store an unbounded or empty name.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Longest room name, in bytes (room names are ASCII).
pub(crate) const MAX_ROOM_LEN: usize = 64;
/// Longest user name, in characters.
pub(crate) const MAX_USER_CHARS: usize = 32;
/// Longest chat text, in bytes: history replays up to 50 of these in one frame.
pub(crate) const MAX_TEXT_LEN: usize = 4096;

/// An event from a client. A missing `room` means the room the connection was opened on.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ClientEvent {
    Join {
        #[serde(default)]
        room: Option<String>,
        #[serde(default)]
        user: Option<String>,
    },
    Leave {
        #[serde(default)]
        room: Option<String>,
    },
    Message {
        #[serde(default)]
        room: Option<String>,
        text: String,
    },
}

impl ClientEvent {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid event: {e}"))
    }
}

/// One chat message as broadcast and as kept in a room's history.
#[derive(Debug, Serialize)]
pub(crate) struct ChatMessage {
    #[serde(serialize_with = "shared_str")]
    pub(crate) room: Arc<str>,
    #[serde(serialize_with = "shared_str")]
    pub(crate) user: Arc<str>,
    pub(crate) text: String,
    #[serde(serialize_with = "shared_str")]
    pub(crate) server: Arc<str>,
    pub(crate) seq: u64,
    /// The process that accepted the message (random per start): with `seq`, what identifies a
    /// message across instances, restarts and the history database. Never sent to clients.
    #[serde(skip)]
    pub(crate) origin: u64,
}

// serde serialises `Arc<str>` only with its `rc` feature, which this crate does not enable.
fn shared_str<S: serde::Serializer>(value: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value)
}

/// An event from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ServerEvent<'a> {
    Message(&'a ChatMessage),
    Sent {
        room: &'a str,
        seq: u64,
        server: &'a str,
    },
    Joined {
        room: &'a str,
        user: &'a str,
        server: &'a str,
    },
    Left {
        room: &'a str,
        user: &'a str,
        server: &'a str,
    },
    History {
        room: &'a str,
        messages: Vec<ServerEvent<'a>>,
        server: &'a str,
    },
    Error {
        error: &'a str,
        server: &'a str,
    },
}

impl ServerEvent<'_> {
    /// Serialises once; the result is shared by every member the event is queued for.
    // serde_json fails only on non-string map keys or a serialiser's own error; these types have
    // neither (string fields, integers, and `shared_str`, which cannot fail), so no input reaches
    // the expect.
    #[allow(clippy::expect_used)]
    pub(crate) fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("server events always serialise"))
    }
}

/// Room names appear in URL paths and in sticky-routing keys, so they stay URL-safe ASCII.
pub(crate) fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Trims a user name and checks it is printable and short; `None` if it is not acceptable.
pub(crate) fn clean_user(user: &str) -> Option<&str> {
    let user = user.trim();
    let chars = user.chars().count();
    let printable = !user.chars().any(char::is_control);
    ((1..=MAX_USER_CHARS).contains(&chars) && printable).then_some(user)
}

/// The first value of `name` in a URL query string, percent- and `+`-decoded; `None` if it is
/// absent or does not decode to UTF-8.
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)?
        .1;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = hex_digit(bytes.next()?)?;
                let lo = hex_digit(bytes.next()?)?;
                out.push((hi << 4) | lo);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_url_safe_and_bounded() {
        assert!(valid_room("lobby"));
        assert!(valid_room("a-b_c.9"));
        assert!(!valid_room(""));
        assert!(!valid_room("a/b"));
        assert!(!valid_room("caf\u{e9}"));
        assert!(!valid_room(&"x".repeat(MAX_ROOM_LEN + 1)));
    }

    #[test]
    fn user_names_are_trimmed_printable_and_bounded() {
        assert_eq!(clean_user("  alice "), Some("alice"));
        assert_eq!(clean_user("   "), None);
        assert_eq!(clean_user("a\nb"), None);
        assert_eq!(
            clean_user(&"\u{e9}".repeat(MAX_USER_CHARS)).map(str::len),
            Some(64)
        );
        assert_eq!(clean_user(&"e".repeat(MAX_USER_CHARS + 1)), None);
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param("user=al%20ice", "user").as_deref(),
            Some("al ice")
        );
        assert_eq!(query_param("x=1&user=a+b", "user").as_deref(), Some("a b"));
        assert_eq!(query_param("user", "user").as_deref(), Some(""));
        assert_eq!(query_param("users=x", "user"), None);
        assert_eq!(query_param("user=%zz", "user"), None);
        assert_eq!(query_param("user=%ff", "user"), None);
    }

    #[test]
    fn events_are_tagged_and_name_the_server() {
        let msg = ChatMessage {
            room: "r".into(),
            user: "u".into(),
            text: "hi".into(),
            server: "a".into(),
            seq: 7,
            origin: 1,
        };
        let history = ServerEvent::History {
            room: "r",
            messages: vec![ServerEvent::Message(&msg)],
            server: "a",
        };
        let value: serde_json::Value = serde_json::from_slice(&history.encode()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type": "history", "room": "r", "server": "a", "messages": [
                {"type": "message", "room": "r", "user": "u", "text": "hi", "server": "a", "seq": 7}
            ]})
        );
    }

    #[test]
    fn unknown_types_and_bad_json_are_errors() {
        assert!(ClientEvent::parse("{").is_err());
        assert!(ClientEvent::parse(r#"{"type":"dance"}"#).is_err());
        assert!(ClientEvent::parse(r#"{"type":"message"}"#).is_err());
        assert!(matches!(
            ClientEvent::parse(r#"{"type":"leave"}"#),
            Ok(ClientEvent::Leave { room: None })
        ));
    }
}
