//! The session protocol's wire formats (docs/sessions.md), free of I/O.
//!
//! A session request is an ordinary request to the application's URL with a `wsgate`
//! query parameter naming the operation; `wsgate_sid` and `wsgate_ack` carry the session id
//! and the client's acknowledgement. The gateway removes these three parameters before the
//! URL reaches the backend, so the backend sees the URL the application asked for.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

pub const PARAM_OP: &str = "wsgate";
pub const PARAM_SID: &str = "wsgate_sid";
pub const PARAM_ACK: &str = "wsgate_ack";

/// Tag byte that starts every message on a session WebSocket: application data follows.
pub const TAG_DATA: u8 = b'd';
/// Tag byte of a session control message: JSON follows (always a text message).
pub const TAG_CONTROL: u8 = b'c';

/// Application close code telling a session WebSocket client that its session no longer
/// exists (expired, closed, or never did): start a new one. "4410" echoes HTTP 410 Gone.
pub const CLOSE_SESSION_GONE: u16 = 4410;
/// Application close code for a session WebSocket replaced by a newer connection of the
/// same session ("4409" echoes HTTP 409 Conflict).
pub const CLOSE_SUPERSEDED: u16 = 4409;
/// Close code a client sends on a session WebSocket to end that connection only: the session
/// stays, to be resumed on another connection (a client switching networks or transports).
pub const CLOSE_DETACH: u16 = 4100;
/// Application close code for a session WebSocket whose session belongs to another route or
/// origin ("4403" echoes HTTP 403).
pub const CLOSE_FORBIDDEN: u16 = 4403;

/// What a session request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `POST`: open a session (backend WebSocket) and answer its id.
    Open,
    /// `GET`: long-poll for backend messages.
    Poll,
    /// `POST`: deliver a batch of client messages.
    Send,
    /// `POST`: close the session with a code and reason.
    Close,
    /// `GET`: Server-Sent Events stream of backend messages.
    Events,
    /// WebSocket upgrade: the session over one WebSocket, opened or resumed.
    Socket,
}

impl Op {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "open" => Self::Open,
            "poll" => Self::Poll,
            "send" => Self::Send,
            "close" => Self::Close,
            "events" => Self::Events,
            "socket" => Self::Socket,
            _ => return None,
        })
    }

    pub fn method(self) -> &'static str {
        match self {
            Self::Open | Self::Send | Self::Close => "POST",
            Self::Poll | Self::Events | Self::Socket => "GET",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Poll => "poll",
            Self::Send => "send",
            Self::Close => "close",
            Self::Events => "events",
            Self::Socket => "socket",
        }
    }
}

/// The session parameters of a request's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionQuery<'a> {
    pub op: Op,
    /// Percent-decoded.
    pub sid: Option<Cow<'a, str>>,
    /// The highest sequence number the client has received (0: none yet).
    pub ack: u64,
    /// The query without the session parameters, `None` when nothing else is left.
    pub rest: Option<String>,
}

/// Reads the session parameters. `Ok(None)`: not a session request (no `wsgate` parameter).
pub fn parse_query(query: Option<&str>) -> Result<Option<SessionQuery<'_>>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut op = None;
    let mut sid = None;
    let mut ack = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            PARAM_OP => op = Some(value),
            PARAM_SID => sid = Some(value),
            PARAM_ACK => ack = Some(value),
            _ => rest.push(pair),
        }
    }
    let Some(op) = op else {
        return Ok(None);
    };
    let op = decode(op)?;
    let ack = ack.map(decode).transpose()?;
    let sid = sid.map(decode).transpose()?;
    let op = Op::parse(&op).ok_or_else(|| {
        format!(
            "unknown session operation {op:?}: expected open, poll, send, close, events or socket"
        )
    })?;
    let ack = match ack.as_deref() {
        None | Some("") => 0,
        Some(text) => parse_seq(text)
            .ok_or_else(|| format!("{PARAM_ACK} must be a whole number, found {text:?}"))?,
    };
    let sid = sid.filter(|s| !s.is_empty());
    if op != Op::Open && op != Op::Socket && sid.is_none() {
        return Err(format!("{} needs the {PARAM_SID} parameter", op.name()));
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    Ok(Some(SessionQuery { op, sid, ack, rest }))
}

fn decode(value: &str) -> Result<Cow<'_, str>, String> {
    percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| format!("session parameter {value:?} is not percent-encoded UTF-8"))
}

/// Sequence numbers are at most 2^53 - 1 so that JavaScript numbers hold them exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

fn parse_seq(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 16 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&n| n <= MAX_SEQ)
}

/// The request target the backend sees: `path` plus what is left of the query.
pub fn backend_target(path: &str, rest: Option<&str>) -> String {
    match rest {
        Some(rest) => format!("{path}?{rest}"),
        None => path.to_owned(),
    }
}

/// An application message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
}

impl Message {
    pub fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A close, from either side: code and reason as on a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    pub code: u16,
    #[serde(default)]
    pub reason: String,
}

/// One step of the backend-to-client stream: a message, or the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    Close(Close),
}

impl Event {
    /// What the event counts against a session's buffer.
    pub fn cost(&self) -> u64 {
        match self {
            Self::Message(message) => message.len() as u64,
            Self::Close(close) => close.reason.len() as u64,
        }
    }
}

/// One event as JSON: `{"seq":N,"text":...}`, `{"seq":N,"binary":"<base64>"}` or
/// `{"seq":N,"close":{"code":C,"reason":R}}`. Borrows the buffered event: an answer is written
/// while the session's buffer is locked, without copying the events out first.
#[derive(Debug, Serialize)]
pub struct WireEvent<'a> {
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close: Option<&'a Close>,
}

impl<'a> WireEvent<'a> {
    pub fn new(seq: u64, event: &'a Event) -> Self {
        let mut wire = Self {
            seq,
            text: None,
            binary: None,
            close: None,
        };
        match event {
            Event::Message(Message::Text(text)) => wire.text = Some(text),
            Event::Message(Message::Binary(bytes)) => wire.binary = Some(BASE64.encode(bytes)),
            Event::Close(close) => wire.close = Some(close),
        }
        wire
    }
}

/// Writes a poll answer, `{"events":[...]}`, one event at a time.
#[derive(Debug)]
pub struct PollAnswer {
    json: Vec<u8>,
    empty: bool,
}

impl PollAnswer {
    pub fn new() -> Self {
        Self {
            json: b"{\"events\":[".to_vec(),
            empty: true,
        }
    }

    pub fn push(&mut self, seq: u64, event: &Event) {
        if !self.empty {
            self.json.push(b',');
        }
        self.empty = false;
        // Serialising plain strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.json, &WireEvent::new(seq, event));
    }

    pub fn is_empty(&self) -> bool {
        self.empty
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.json.extend_from_slice(b"]}");
        self.json
    }
}

impl Default for PollAnswer {
    fn default() -> Self {
        Self::new()
    }
}

/// A client message in a send batch: exactly one of `text` and `binary` (base64).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub binary: Option<String>,
}

/// The body of a send request: messages numbered `seq`, `seq + 1`, ...
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendBatch {
    pub seq: u64,
    #[serde(default)]
    pub messages: Vec<WireMessage>,
    /// An acknowledgement of backend events, for clients reading an event stream.
    #[serde(default)]
    pub ack: Option<u64>,
}

impl SendBatch {
    /// The messages, decoded; an error names the first bad one.
    pub fn decode(self) -> Result<(u64, Vec<Message>, Option<u64>), String> {
        if self.seq == 0 || self.seq > MAX_SEQ {
            return Err(format!(
                "seq must be from 1 to {MAX_SEQ}, found {}",
                self.seq
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, message) in self.messages.into_iter().enumerate() {
            messages.push(match (message.text, message.binary) {
                (Some(text), None) => Message::Text(text),
                (None, Some(encoded)) => {
                    Message::Binary(BASE64.decode(encoded).map_err(|error| {
                        format!("messages[{i}].binary is not valid base64: {error}")
                    })?)
                }
                _ => {
                    return Err(format!(
                        "messages[{i}] needs exactly one of \"text\" and \"binary\""
                    ));
                }
            });
        }
        Ok((self.seq, messages, self.ack))
    }
}

/// The optional body of an open request.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// Subprotocols offered to the backend, as in `Sec-WebSocket-Protocol`.
    #[serde(default)]
    pub protocols: Vec<String>,
}

/// The answer to an open request, and (with `"type":"open"`) the first control message on a
/// session WebSocket.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Opened {
    pub session: String,
    pub instance: String,
    pub protocol: Option<String>,
    /// The highest client sequence number delivered to the backend: the client resends what
    /// follows it.
    pub received: u64,
    pub poll_timeout_ms: u64,
    pub timeout_ms: u64,
    pub max_batch: u64,
}

/// Control messages on a session WebSocket (after the [`TAG_CONTROL`] byte).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    /// Gateway → client, first message: the session and where the client stands.
    Open(Opened),
    /// Either way: the highest sequence number received from the other side.
    Ack { received: u64 },
}

/// A JSON error body: `{"error": "..."}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
}

/// Appends the Server-Sent Events record of `event` numbered `seq` to `out` (text as a JSON
/// string so line breaks survive, binary as base64, close as JSON).
pub fn push_sse_record(out: &mut String, seq: u64, event: &Event) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(out, "id: {seq}\nevent: ");
    match event {
        Event::Message(Message::Text(text)) => {
            out.push_str("text\ndata: ");
            // JSON keeps the text on one data line; a plain string always serialises.
            out.push_str(&serde_json::to_string(text).unwrap_or_default());
        }
        Event::Message(Message::Binary(bytes)) => {
            out.push_str("binary\ndata: ");
            BASE64.encode_string(bytes, out);
        }
        Event::Close(close) => {
            out.push_str("close\ndata: ");
            out.push_str(&serde_json::to_string(close).unwrap_or_default());
        }
    }
    out.push_str("\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_queries_are_not_session_requests() {
        assert_eq!(parse_query(None), Ok(None));
        assert_eq!(parse_query(Some("room=a&x=1")), Ok(None));
        assert_eq!(parse_query(Some("wsgatex=open")), Ok(None));
    }

    #[test]
    fn session_parameters_are_taken_out_and_the_rest_kept_in_order() {
        let query = parse_query(Some("b=2&wsgate=poll&a=1&wsgate_sid=abc&wsgate_ack=7&c"))
            .unwrap()
            .unwrap();
        assert_eq!(query.op, Op::Poll);
        assert_eq!(query.sid.as_deref(), Some("abc"));
        assert_eq!(query.ack, 7);
        assert_eq!(query.rest.as_deref(), Some("b=2&a=1&c"));
        assert_eq!(
            backend_target("/rooms/x", query.rest.as_deref()),
            "/rooms/x?b=2&a=1&c"
        );
        let open = parse_query(Some("wsgate=open")).unwrap().unwrap();
        assert_eq!(
            (open.op, open.sid, open.ack, open.rest),
            (Op::Open, None, 0, None)
        );
    }

    #[test]
    fn bad_parameters_are_explained() {
        let err = parse_query(Some("wsgate=fetch")).unwrap_err();
        assert!(err.contains("unknown session operation \"fetch\""), "{err}");
        let err = parse_query(Some("wsgate=poll")).unwrap_err();
        assert!(err.contains("wsgate_sid"), "{err}");
        for ack in ["-1", "x", "1e3", "99999999999999999999", "9007199254740992"] {
            let query = format!("wsgate=poll&wsgate_sid=a&wsgate_ack={ack}");
            let err = parse_query(Some(&query)).unwrap_err();
            assert!(err.contains("whole number"), "{ack}: {err}");
        }
        assert!(parse_query(Some("wsgate=poll&wsgate_sid=a&wsgate_ack=9007199254740991")).is_ok());
    }

    #[test]
    fn poll_answers_carry_every_event_kind_as_json() {
        let events = [
            Event::Message(Message::Text("line\nbreak \u{e9}".into())),
            Event::Message(Message::Binary(vec![0, 255, 7])),
            Event::Close(Close {
                code: 1000,
                reason: "bye".into(),
            }),
        ];
        let mut answer = PollAnswer::new();
        assert!(answer.is_empty());
        for (i, event) in events.iter().enumerate() {
            answer.push(i as u64 + 1, event);
        }
        let json: serde_json::Value = serde_json::from_slice(&answer.finish()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"events": [
                {"seq": 1, "text": "line\nbreak \u{e9}"},
                {"seq": 2, "binary": "AP8H"},
                {"seq": 3, "close": {"code": 1000, "reason": "bye"}},
            ]})
        );
        let empty: serde_json::Value = serde_json::from_slice(&PollAnswer::new().finish()).unwrap();
        assert_eq!(empty, serde_json::json!({"events": []}));
    }

    #[test]
    fn send_batches_decode_or_name_the_bad_message() {
        let batch: SendBatch =
            serde_json::from_str(r#"{"seq":3,"messages":[{"text":"a"},{"binary":"AAE="}]}"#)
                .unwrap();
        let (seq, messages, ack) = batch.decode().unwrap();
        assert_eq!((seq, ack), (3, None));
        assert_eq!(
            messages,
            [Message::Text("a".into()), Message::Binary(vec![0, 1])]
        );
        let both: SendBatch =
            serde_json::from_str(r#"{"seq":1,"messages":[{"text":"a"},{"text":"b","binary":""}]}"#)
                .unwrap();
        assert!(both.decode().unwrap_err().contains("messages[1]"));
        let bad: SendBatch =
            serde_json::from_str(r#"{"seq":1,"messages":[{"binary":"!!"}]}"#).unwrap();
        assert!(bad.decode().unwrap_err().contains("base64"));
        let zero: SendBatch = serde_json::from_str(r#"{"seq":0}"#).unwrap();
        assert!(zero.decode().is_err());
        assert!(serde_json::from_str::<SendBatch>(r#"{"seq":1,"extra":1}"#).is_err());
    }

    #[test]
    fn sse_records_keep_text_on_one_data_line() {
        let mut record = String::new();
        push_sse_record(
            &mut record,
            4,
            &Event::Message(Message::Text("a\nb".into())),
        );
        assert_eq!(record, "id: 4\nevent: text\ndata: \"a\\nb\"\n\n");
        let mut both = record.clone();
        push_sse_record(
            &mut both,
            5,
            &Event::Close(Close {
                code: 1001,
                reason: String::new(),
            }),
        );
        assert_eq!(
            &both[record.len()..],
            "id: 5\nevent: close\ndata: {\"code\":1001,\"reason\":\"\"}\n\n"
        );
        let mut binary = String::new();
        push_sse_record(
            &mut binary,
            6,
            &Event::Message(Message::Binary(vec![0, 255, 7])),
        );
        assert_eq!(binary, "id: 6\nevent: binary\ndata: AP8H\n\n");
    }

    #[test]
    fn control_messages_are_tagged_json() {
        let json = serde_json::to_string(&Control::Ack { received: 9 }).unwrap();
        assert_eq!(json, r#"{"type":"ack","received":9}"#);
        let back: Control = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Control::Ack { received: 9 });
    }
}
