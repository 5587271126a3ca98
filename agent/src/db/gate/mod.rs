//! The databases' gate on what changed since a verified point: [`verified_point`] for a
//! physical standby (both sides' table files are the same) and its helpers shared with
//! [`block_point`], a subscriber's point (each side sums its own blocks).

pub mod block_point;
pub mod verified_point;
