//! Data dirs and the configuration file set, on both sides of a pull.
//!
//! Owns the rsync argument screen ([`rsync_args`]), the target's pulls ([`pull`]), per-dir
//! and per-path manifests ([`manifest`]), the origin's change journal ([`change_journal`]),
//! the config set's list and install ([`config_set`]), and the origin's half of the file
//! verbs ([`serve`]). Called by the top (the gRPC service and the data plane's listener);
//! calls only the plane's framing and grants.

pub mod change_journal;
pub mod config_copy;
pub mod config_set;
pub mod mail_queue;
pub mod manifest;
pub mod pull;
pub mod rsync_args;
pub mod serve;
