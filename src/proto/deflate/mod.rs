//! permessage-deflate (RFC 7692): the negotiation, pure. The compression itself runs in the
//! relay (`relay::compress`), which owns the buffers it writes into.

pub mod negotiate;

pub use negotiate::{Agreed, Offer, OfferError, Preferences, negotiate, parse_offer};
