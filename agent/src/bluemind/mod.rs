//! BlueMind's own REST API on the target, after the cutover ([`post_migration`]: firewall,
//! mail maintenance, mynetworks). Called by the gRPC service; calls nothing of the agent but
//! its configuration.

pub mod post_migration;
