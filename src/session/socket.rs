//! Whole messages over one WebSocket hop that the gateway terminates itself: a session's
//! backend connection (client role) and a session client's WebSocket (server role). The relay
//! forwards frames without assembling them; a session must hold messages, so here frames are
//! decoded by the same [`FrameDecoder`] (same limits, same close codes) and collected.
//!
//! [`MessageReader::next`] is cancel-safe: everything read is kept in the reader, so it can
//! sit in a `select!` beside other work without losing bytes.

use super::protocol::{Close, Message};
use crate::proto::{
    CloseCode, ControlFrame, DecoderConfig, FrameDecoder, FrameHeader, Item, MIN_BUFFER_LEN,
    OpCode, PING_PAYLOAD, ProtocolError, Role, apply_mask, close_frame, parse_close_payload,
};
use crate::relay::mask_keys::next_mask_key;
use crate::stream::Stream;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

const READ_BUFFER: usize = 16 << 10;

/// What arrived on the hop.
#[derive(Debug)]
pub enum Received {
    Message(Message),
    /// A ping to answer with a pong carrying `payload`.
    Ping(Vec<u8>),
    Pong,
    /// The peer's close frame (`None`: it carried no code).
    Close(Option<Close>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed without a close frame")]
    Eof,
    #[error("{}", .0.reason())]
    Protocol(ProtocolError),
}

/// Splits a hop into its reading and writing halves.
pub fn split(
    stream: Stream,
    early: &[u8],
    config: DecoderConfig,
) -> (MessageReader, MessageWriter) {
    let role = config.role;
    let (read, write) = tokio::io::split(stream);
    let mut buf = vec![0; READ_BUFFER.max(early.len())];
    buf[..early.len()].copy_from_slice(early);
    (
        MessageReader {
            io: read,
            decoder: FrameDecoder::new(config),
            buf,
            start: 0,
            end: early.len(),
            message: Vec::new(),
            kind: OpCode::Binary,
        },
        MessageWriter {
            io: write,
            // §5.1: a client masks every frame; a server never does.
            masked: role == Role::Client,
            scratch: Vec::new(),
        },
    )
}

#[derive(Debug)]
pub struct MessageReader {
    io: ReadHalf<Stream>,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The payload of the message in progress.
    message: Vec<u8>,
    kind: OpCode,
}

impl MessageReader {
    /// The next message or control frame.
    pub async fn next(&mut self) -> Result<Received, ReadError> {
        loop {
            if let Some(received) = self.decode()? {
                return Ok(received);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            debug_assert!(self.buf.len() - self.end >= MIN_BUFFER_LEN);
            let read = self.io.read(&mut self.buf[self.end..]).await?;
            if read == 0 {
                return Err(ReadError::Eof);
            }
            self.end += read;
        }
    }

    /// Decodes what is buffered until something completes or more bytes are needed.
    fn decode(&mut self) -> Result<Option<Received>, ReadError> {
        loop {
            let window = &mut self.buf[self.start..self.end];
            let decoded = match self.decoder.decode(window) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => return Ok(None),
                Err(error) => return Err(ReadError::Protocol(error)),
            };
            match decoded.item {
                Item::DataFrame(header) => {
                    if header.opcode != OpCode::Continuation {
                        self.kind = header.opcode;
                        self.message.clear();
                    }
                }
                Item::Payload(piece) => {
                    let bytes = &mut window[..piece.len];
                    if let Some(key) = piece.mask {
                        apply_mask(bytes, key);
                    }
                    self.message.extend_from_slice(bytes);
                    if piece.message_end {
                        self.start += decoded.consumed;
                        return Ok(Some(Received::Message(self.take_message())));
                    }
                }
                Item::Control { header, payload } => {
                    let payload = &window[payload];
                    let received = match header.opcode {
                        OpCode::Ping => Received::Ping(payload.to_vec()),
                        OpCode::Pong => Received::Pong,
                        _ => {
                            let close =
                                parse_close_payload(payload).map_err(ReadError::Protocol)?;
                            Received::Close(close.code.map(|code| Close {
                                code: code.0,
                                reason: close.reason.to_owned(),
                            }))
                        }
                    };
                    self.start += decoded.consumed;
                    return Ok(Some(received));
                }
            }
            self.start += decoded.consumed;
        }
    }

    fn take_message(&mut self) -> Message {
        let payload = std::mem::take(&mut self.message);
        match self.kind {
            // The decoder validated text as it passed.
            OpCode::Text => Message::Text(
                String::from_utf8(payload)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
            _ => Message::Binary(payload),
        }
    }
}

/// Appends `message` as one frame to `out`, with `tag` (if any) before its payload; masked
/// with a fresh key when `masked` (the client role).
pub fn encode_message(out: &mut Vec<u8>, masked: bool, message: &Message, tag: Option<u8>) {
    let (opcode, payload) = match message {
        Message::Text(text) => (OpCode::Text, text.as_bytes()),
        Message::Binary(bytes) => (OpCode::Binary, bytes.as_slice()),
    };
    encode_frame(out, masked, opcode, tag, payload);
}

fn encode_frame(out: &mut Vec<u8>, masked: bool, opcode: OpCode, tag: Option<u8>, payload: &[u8]) {
    let tag_len = usize::from(tag.is_some());
    let mask = masked.then(next_mask_key);
    let header = FrameHeader::new(true, opcode, mask, (payload.len() + tag_len) as u64);
    out.extend_from_slice(header.encode().as_bytes());
    let body_at = out.len();
    out.extend(tag);
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[body_at..], key);
    }
}

#[derive(Debug)]
pub struct MessageWriter {
    io: WriteHalf<Stream>,
    masked: bool,
    scratch: Vec<u8>,
}

impl MessageWriter {
    /// Sends `messages`, one frame each, with one write.
    pub async fn send_all(&mut self, messages: &[Message]) -> io::Result<()> {
        self.scratch.clear();
        for message in messages {
            encode_message(&mut self.scratch, self.masked, message, None);
        }
        self.flush_scratch().await
    }

    /// Sends a text frame holding `tag` then `text`.
    pub async fn send_text(&mut self, tag: u8, text: &str) -> io::Result<()> {
        self.send_frame(OpCode::Text, Some(tag), text.as_bytes())
            .await
    }

    async fn send_frame(
        &mut self,
        opcode: OpCode,
        tag: Option<u8>,
        payload: &[u8],
    ) -> io::Result<()> {
        self.scratch.clear();
        encode_frame(&mut self.scratch, self.masked, opcode, tag, payload);
        self.flush_scratch().await
    }

    async fn flush_scratch(&mut self) -> io::Result<()> {
        let result = self.io.write_all(&self.scratch).await;
        // A large message's copy is not kept for the life of the session.
        if self.scratch.capacity() > READ_BUFFER {
            self.scratch = Vec::new();
        }
        result
    }

    /// Writes frames already encoded with [`encode_frame`] (with this writer's masking).
    pub async fn write_encoded(&mut self, frames: &[u8]) -> io::Result<()> {
        self.io.write_all(frames).await
    }

    pub async fn pong(&mut self, payload: &[u8]) -> io::Result<()> {
        let frame = ControlFrame::new(OpCode::Pong, payload, self.masked.then(next_mask_key));
        self.io.write_all(frame.as_bytes()).await
    }

    pub async fn ping(&mut self) -> io::Result<()> {
        let frame = ControlFrame::new(OpCode::Ping, PING_PAYLOAD, self.masked.then(next_mask_key));
        self.io.write_all(frame.as_bytes()).await
    }

    pub async fn close(&mut self, code: CloseCode, reason: &str) -> io::Result<()> {
        let frame = close_frame(code, reason, self.masked.then(next_mask_key));
        self.io.write_all(frame.as_bytes()).await?;
        self.io.flush().await
    }

    /// Closes the write side of the socket (FIN).
    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}
