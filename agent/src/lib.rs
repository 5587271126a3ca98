//! The bmfleet agent: runs on every origin and target host and offers typed migration
//! operations to the orchestrator (never a shell passthrough).
//!
//! The crate is grouped in rooms, and arrows go one way: the top ([`server`], the gRPC
//! service, and [`data_plane`], the data plane's listener with its one table of verbs) calls
//! the rooms; rooms call the plane's framing ([`plane`]) and the database room's connection
//! builder ([`db::pg`]); nothing calls back up. Shared below everything: [`config`],
//! [`command`], [`metrics`], [`operations`].
//!
//! - [`plane`]: the data plane's wire (requests, replies, framing, the client) and its
//!   grants; what every other room speaks to cross hosts.
//! - [`files`]: data dirs and the config set: pulls, the rsync argument screen, manifests,
//!   the change journal.
//! - [`db`]: PostgreSQL: the hardened connection builder, dump and restore, the physical
//!   standby, logical replication, verified points and the downtime's gate.
//! - [`host`]: this host: facts, services, the served marker, the service IP's cutover.
//! - [`bluemind`]: BlueMind's own API (post-migration calls).
#![forbid(unsafe_code)]

pub mod bluemind;
pub mod command;
pub mod config;
pub mod data_plane;
pub mod db;
pub mod files;
pub mod host;
pub mod metrics;
pub mod operations;
pub mod plane;
pub mod server;
