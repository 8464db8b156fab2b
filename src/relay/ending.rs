//! How a relayed connection ended, as typed values: who started the end, why, and the close
//! codes exchanged on each hop. The access log, the metrics and the dashboard render these;
//! nothing downstream matches on message text.

use super::Side;
use crate::proto::CloseCode;
use std::fmt;

/// Who started the end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    Client,
    Backend,
    Gateway,
}

impl Initiator {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
            Self::Gateway => "gateway",
        }
    }

    pub(crate) const fn of(side: Side) -> Self {
        match side {
            Side::Client => Self::Client,
            Side::Backend => Self::Backend,
        }
    }
}

/// Why a connection ended: the first event that started its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A hop sent a close frame.
    CloseHandshake(Side),
    /// A hop closed TCP without a close frame.
    Disconnected(Side),
    /// Reading from or writing to a hop failed (reset, broken pipe).
    IoError(Side),
    /// A hop broke RFC 6455 (1002, 1007, 1009) or a policy (1008): the code it was sent.
    Violation {
        side: Side,
        code: CloseCode,
        reason: &'static str,
    },
    /// A hop did not answer a keepalive ping in time.
    PingTimeout(Side),
    /// No data message passed for the route's idle timeout.
    IdleTimeout,
    /// The gateway shut down.
    Shutdown,
    /// The sticky key moved to another backend (1012 to the client).
    Moved,
    /// The client's token expired (the route's close code to the client, 1001 to the backend).
    Expired,
}

impl Cause {
    /// A short fixed label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::CloseHandshake(_) => "close_handshake",
            Self::Disconnected(_) => "disconnected",
            Self::IoError(_) => "io_error",
            Self::Violation { code, .. } if code.0 == CloseCode::POLICY_VIOLATION.0 => "policy",
            Self::Violation { .. } => "protocol_error",
            Self::PingTimeout(_) => "ping_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Shutdown => "shutdown",
            Self::Moved => "moved",
            Self::Expired => "token_expired",
        }
    }

    /// Whether the cause is a policy violation (1008) rather than a protocol error.
    pub const fn is_policy(self) -> bool {
        matches!(self, Self::Violation { code, .. } if code.0 == CloseCode::POLICY_VIOLATION.0)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CloseHandshake(side) => write!(f, "{side} sent a close frame"),
            Self::Disconnected(side) => {
                write!(f, "{side} closed the connection without a close frame")
            }
            Self::IoError(side) => write!(f, "{side} connection failed"),
            Self::Violation { side, reason, .. } => {
                let kind = if self.is_policy() {
                    "policy violation"
                } else {
                    "protocol error"
                };
                write!(f, "{side} {kind}: {reason}")
            }
            Self::PingTimeout(side) => write!(f, "{side} did not answer ping in time"),
            Self::IdleTimeout => f.write_str("idle timeout"),
            Self::Shutdown => f.write_str("gateway shutting down"),
            Self::Moved => f.write_str("sticky key moved to another backend"),
            Self::Expired => f.write_str("client token expired"),
        }
    }
}

/// What happened on one hop, for the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopReport {
    pub bytes_in: u64,
    pub messages_in: u64,
    pub close_received: Option<u16>,
    /// The close code sent to the hop; 1006 when its TCP was cut instead (a close frame
    /// cannot interrupt a frame in progress).
    pub close_sent: Option<u16>,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayReport {
    pub client: HopReport,
    pub backend: HopReport,
    pub initiator: Initiator,
    pub cause: Cause,
}
