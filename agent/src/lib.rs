//! The bmfleet agent: runs on every origin and target host and offers typed migration
//! operations to the orchestrator (never a shell passthrough).
//!
//! - [`config`]: the TOML configuration (`data_root`, identity, service commands).
//! - [`facts`]: what the host is (versions, data dirs, users).
//! - [`services`]: stopping and starting BlueMind's services.
//! - [`operations`]: the journal that makes every mutating call run at most once per id.
//! - [`server`]: the gRPC service and its mutual-TLS listener.
#![forbid(unsafe_code)]

pub mod command;
pub mod config;
pub mod facts;
pub mod operations;
pub mod server;
pub mod services;
