//! PostgreSQL, on both sides of a migration.
//!
//! Every statement the agent runs goes through one connection builder ([`pg`]), hardened
//! for databases that came from another host. Below everything here: [`wal`] (positions and
//! the names a grant gives what it makes), [`follow`] (what this host follows), [`compare`]
//! (both sides' manifests). The origin's side: [`replication`] (a grant's role, slot and the
//! relay, whose screen on the startup packet is [`startup`]), [`publication`], [`leftovers`], and the handlers of the database verbs
//! ([`serve`]). The target's side: [`databases`] (dump and restore), [`standby`],
//! [`subscription`], [`follower`] (promotion and the follow's end, whichever kind), and
//! the gate on what changed ([`gate`]). Called by the top (the gRPC service, the data
//! plane's listener) and, for the connection builder only, by the host room.

pub mod compare;
pub mod databases;
pub mod follow;
pub mod follower;
pub mod gate;
pub mod leftovers;
pub mod pg;
pub mod publication;
pub mod replication;
pub mod serve;
pub mod standby;
pub mod startup;
pub mod subscription;
pub mod wal;
