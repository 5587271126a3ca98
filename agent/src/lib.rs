//! The bmfleet agent: runs on every origin and target host and offers typed migration
//! operations to the orchestrator (never a shell passthrough).
//!
//! - [`config`]: the TOML configuration (`data_root`, identity, service commands).
//! - [`facts`]: what the host is (versions, data dirs, users).
//! - [`services`]: stopping and starting BlueMind's services.
//! - [`operations`]: the journal that makes every mutating call run at most once per id.
//! - [`server`]: the gRPC service and its mutual-TLS listener; [`metrics`]: its own
//!   Prometheus metrics.
//! - Data plane, origin side: [`grants`], [`rsync_args`], [`data_plane`].
//! - Data plane, target side: [`tunnel`] (also the `bmfleet-agent tunnel` remote shell),
//!   [`pull`] (data dirs), [`databases`], [`config_set`]; [`pg`] for PostgreSQL.
#![forbid(unsafe_code)]

pub mod block_point;
pub mod change_journal;
pub mod command;
pub mod config;
pub mod config_set;
pub mod cutover;
pub mod data_plane;
pub mod databases;
pub mod facts;
pub mod grants;
pub mod manifest;
pub mod metrics;
pub mod operations;
pub mod pg;
pub mod post_migration;
pub mod publication;
pub mod pull;
pub mod replication;
pub mod rsync_args;
pub mod served;
pub mod server;
pub mod services;
pub mod standby;
pub mod subscription;
pub mod tunnel;
pub mod verified_point;
