//! The data plane's own room: what crosses between two agents and under which grant.
//!
//! Owns the wire ([`tunnel`]: request and reply lines, data framing, the relay of a byte
//! stream, and the client a target opens to its origin) and the grants ([`grants`]: who
//! may ask what of this origin, for how long, inside which paths). It calls nothing of the
//! agent but [`crate::config`]; every room that crosses hosts calls it. The listener that
//! admits a connection and hands a verb to the room that owns it is at the top
//! ([`crate::data_plane`]).

pub mod answer;
pub mod grants;
pub mod tunnel;
