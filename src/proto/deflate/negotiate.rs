//! permessage-deflate negotiation, server side (RFC 7692 §5, §7.1): parse each offer a client
//! makes, decline the ones the RFC says must be declined, and answer the first acceptable one
//! with parameters chosen from the gateway's preferences.
//!
//! Invariants:
//! - an offer with an unknown parameter, a repeated parameter or a value outside the RFC's
//!   grammar is declined as a whole (§5.1: "MUST decline"), and the next offer is tried;
//! - the answer never carries a parameter the RFC forbids in it: `client_max_window_bits` only
//!   when the client offered it (§7.1.2.2), `server_max_window_bits` never above what the client
//!   offered (§7.1.2.1), `server_no_context_takeover` whenever the client asked for it;
//! - the windows the answer names are the ones the gateway compresses with and inflates for.

use crate::proto::handshake::headers::{find_unquoted, parse_extension, split_list};

/// The extension's registered name (RFC 7692 §7).
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The smallest LZ77 window a compressor of ours can honour: zlib writes a 9-bit window when
/// asked for 8 (its deflateInit2 documents the substitution), so an offer insisting on 8 for
/// the server is declined rather than answered with a promise zlib would break.
pub const MIN_SERVER_WINDOW_BITS: u8 = 9;
/// The RFC's smallest window (§7.1.2).
pub const MIN_WINDOW_BITS: u8 = 8;
/// The RFC's largest window, and the default when a parameter is absent (§7.1.2).
pub const MAX_WINDOW_BITS: u8 = 15;

/// What the gateway would like to agree on; a client's offer can only make it stricter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preferences {
    /// Ask for a fresh compressor per message towards the client: no state is held between
    /// messages, at some cost in ratio on small similar messages.
    pub server_no_context_takeover: bool,
    /// Ask the client to compress every message afresh, so no inflate state is held between
    /// messages (the client must comply, §7.1.1.2).
    pub client_no_context_takeover: bool,
    /// Window for what the gateway compresses, 9..=15.
    pub server_max_window_bits: u8,
    /// Window asked of the client (when it offers `client_max_window_bits`), 8..=15.
    pub client_max_window_bits: u8,
}

impl Default for Preferences {
    /// No state between messages and 2 KiB windows: an idle connection holds no compression
    /// state at all; chat-sized messages lose little ratio with a small window.
    fn default() -> Self {
        Self {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 11,
            client_max_window_bits: 11,
        }
    }
}

/// `client_max_window_bits` as offered: with no value the client only says it supports the
/// parameter in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientWindow {
    NotOffered,
    Supported,
    AtMost(u8),
}

/// One parsed offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    pub client_max_window_bits: ClientWindow,
}

/// Why an offer is declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferError {
    UnknownParameter,
    RepeatedParameter,
    /// A value where none is allowed, none where one is required, or not 8..=15 without
    /// leading zeros.
    InvalidValue,
}

/// The agreed parameters, as the gateway applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    /// The window the gateway compresses with.
    pub server_max_window_bits: u8,
    /// The window the client compresses with: what the gateway inflates with.
    pub client_max_window_bits: u8,
    /// Whether the answer names `server_max_window_bits` / `client_max_window_bits`.
    name_server_window: bool,
    name_client_window: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub fn response(&self) -> String {
        let mut out = String::from(PERMESSAGE_DEFLATE);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if self.name_server_window {
            out.push_str("; server_max_window_bits=");
            out.push_str(&self.server_max_window_bits.to_string());
        }
        if self.name_client_window {
            out.push_str("; client_max_window_bits=");
            out.push_str(&self.client_max_window_bits.to_string());
        }
        out
    }
}

/// Parses the parameters of one `permessage-deflate` offer (the text after its first `;`).
pub fn parse_offer(params: &str) -> Result<Offer, OfferError> {
    let mut offer = Offer {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: None,
        client_max_window_bits: ClientWindow::NotOffered,
    };
    for param in split_params(params) {
        let (name, value) = match find_unquoted(param, b'=') {
            Some(at) => (param[..at].trim(), Some(unquote(param[at + 1..].trim())?)),
            None => (param.trim(), None),
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => {
                flag(&mut offer.server_no_context_takeover, value)?;
            }
            "client_no_context_takeover" => {
                flag(&mut offer.client_no_context_takeover, value)?;
            }
            "server_max_window_bits" => {
                if offer.server_max_window_bits.is_some() {
                    return Err(OfferError::RepeatedParameter);
                }
                let bits = value.ok_or(OfferError::InvalidValue)?;
                offer.server_max_window_bits = Some(window_bits(bits)?);
            }
            "client_max_window_bits" => {
                if offer.client_max_window_bits != ClientWindow::NotOffered {
                    return Err(OfferError::RepeatedParameter);
                }
                offer.client_max_window_bits = match value {
                    None => ClientWindow::Supported,
                    Some(bits) => ClientWindow::AtMost(window_bits(bits)?),
                };
            }
            _ => return Err(OfferError::UnknownParameter),
        }
    }
    Ok(offer)
}

/// Answers the first acceptable `permessage-deflate` offer among `elements` (the
/// `Sec-WebSocket-Extensions` list elements, in the client's order of preference), or `None`
/// when no offer can be accepted: the connection then goes on without compression.
pub fn negotiate<'a>(
    elements: impl IntoIterator<Item = &'a str>,
    preferences: &Preferences,
) -> Option<Agreed> {
    elements.into_iter().find_map(|element| {
        let extension = parse_extension(element);
        if !extension.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
            return None;
        }
        let offer = parse_offer(extension.params).ok()?;
        answer(&offer, preferences)
    })
}

/// The answer to one valid offer, or `None` when the gateway cannot honour it.
pub fn answer(offer: &Offer, preferences: &Preferences) -> Option<Agreed> {
    let preferred_server = preferences
        .server_max_window_bits
        .clamp(MIN_SERVER_WINDOW_BITS, MAX_WINDOW_BITS);
    let (server_max_window_bits, name_server_window) = match offer.server_max_window_bits {
        // The client limits our window; we may use a smaller one and say so (§7.1.2.1).
        Some(limit) if limit < MIN_SERVER_WINDOW_BITS => return None,
        Some(limit) => (preferred_server.min(limit), true),
        // Not asked: naming a smaller window lets the client inflate with less memory.
        None => (preferred_server, preferred_server < MAX_WINDOW_BITS),
    };
    let preferred_client = preferences
        .client_max_window_bits
        .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
    let (client_max_window_bits, name_client_window) = match offer.client_max_window_bits {
        // Without the parameter in the offer the answer must not name it (§7.1.2.2): the
        // client may use the full window.
        ClientWindow::NotOffered => (MAX_WINDOW_BITS, false),
        ClientWindow::Supported => (preferred_client, true),
        ClientWindow::AtMost(limit) => (preferred_client.min(limit), true),
    };
    Some(Agreed {
        server_no_context_takeover: offer.server_no_context_takeover
            || preferences.server_no_context_takeover,
        client_no_context_takeover: offer.client_no_context_takeover
            || preferences.client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
        name_server_window,
        name_client_window,
    })
}

/// The parameters of an offer, split on `;` outside quoted strings.
fn split_params(params: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(params);
    std::iter::from_fn(move || {
        loop {
            let current = rest?;
            let end = find_unquoted(current, b';').unwrap_or(current.len());
            let param = current[..end].trim();
            rest = current.get(end + 1..);
            if !param.is_empty() {
                return Some(param);
            }
        }
    })
}

/// A value as a token or a quoted string (RFC 6455 §9.1), without its quotes. The values this
/// extension defines are digits, so an escape inside quotes is never valid.
fn unquote(value: &str) -> Result<&str, OfferError> {
    match value.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .filter(|inner| !inner.contains(['"', '\\']))
            .ok_or(OfferError::InvalidValue),
        None => Ok(value),
    }
}

fn flag(seen: &mut bool, value: Option<&str>) -> Result<(), OfferError> {
    if *seen {
        return Err(OfferError::RepeatedParameter);
    }
    if value.is_some() {
        return Err(OfferError::InvalidValue);
    }
    *seen = true;
    Ok(())
}

/// §7.1.2: a decimal integer 8..=15 without leading zeros.
fn window_bits(value: &str) -> Result<u8, OfferError> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OfferError::InvalidValue);
    }
    value
        .parse::<u8>()
        .ok()
        .filter(|bits| (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(bits))
        .ok_or(OfferError::InvalidValue)
}

/// The `Sec-WebSocket-Extensions` list elements of a header value.
pub fn elements(value: &str) -> impl Iterator<Item = &str> {
    split_list(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agree(header: &str) -> Option<String> {
        negotiate(elements(header), &Preferences::default()).map(|a| a.response())
    }

    #[test]
    fn browser_offer_is_answered_with_small_windows_and_no_context_takeover() {
        assert_eq!(
            agree("permessage-deflate; client_max_window_bits").as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=11; client_max_window_bits=11"
            )
        );
    }

    #[test]
    fn client_window_is_named_only_when_offered() {
        let agreed = negotiate(elements("permessage-deflate"), &Preferences::default()).unwrap();
        assert_eq!(agreed.client_max_window_bits, 15);
        assert!(!agreed.response().contains("client_max_window_bits"));
    }

    #[test]
    fn offered_limits_make_the_answer_stricter_never_looser() {
        let agreed = negotiate(
            elements("permessage-deflate; server_max_window_bits=10; client_max_window_bits=9"),
            &Preferences::default(),
        )
        .unwrap();
        assert_eq!(
            (agreed.server_max_window_bits, agreed.client_max_window_bits),
            (10, 9)
        );
        let prefs = Preferences {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        };
        let agreed = negotiate(
            elements("permessage-deflate; server_no_context_takeover; server_max_window_bits=12"),
            &prefs,
        )
        .unwrap();
        assert!(agreed.server_no_context_takeover);
        assert!(!agreed.client_no_context_takeover);
        assert_eq!(
            agreed.response(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=12"
        );
        // Without a window in the offer and with the full window preferred, none is named.
        assert_eq!(
            negotiate(elements("permessage-deflate"), &prefs)
                .unwrap()
                .response(),
            "permessage-deflate"
        );
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_is_tried() {
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=\"x\"",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=1a",
            "permessage-deflate; client_max_window_bits=; x",
            "permessage-deflate; client_max_window_bits=15; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=\"1\\2\"",
        ] {
            assert_eq!(agree(bad), None, "{bad}");
            let with_fallback = format!("{bad}, permessage-deflate; server_max_window_bits=12");
            assert_eq!(
                negotiate(elements(&with_fallback), &Preferences::default())
                    .map(|a| a.server_max_window_bits),
                Some(11),
                "{bad}"
            );
        }
    }

    #[test]
    fn quoted_values_and_case_are_accepted() {
        let agreed = negotiate(
            elements("x-webkit-deflate-frame, Permessage-Deflate; SERVER_MAX_WINDOW_BITS=\"10\""),
            &Preferences::default(),
        )
        .unwrap();
        assert_eq!(agreed.server_max_window_bits, 10);
    }

    #[test]
    fn a_server_window_of_8_is_declined_because_zlib_cannot_keep_it() {
        assert_eq!(agree("permessage-deflate; server_max_window_bits=8"), None);
        // 8 for the client is fine: a larger inflate window reads any smaller one.
        let agreed = negotiate(
            elements("permessage-deflate; client_max_window_bits=8"),
            &Preferences::default(),
        )
        .unwrap();
        assert_eq!(agreed.client_max_window_bits, 8);
    }

    #[test]
    fn other_extensions_are_not_answered() {
        assert_eq!(agree("x-webkit-deflate-frame"), None);
        assert_eq!(agree(""), None);
    }
}
