//! This host itself: what it is ([`facts`]), BlueMind's services ([`services`]), whether it
//! has served ([`served`]), and the service IP's release, take and announcement
//! ([`cutover`]). Called by the gRPC service; calls the database room's connection builder
//! only (facts read PostgreSQL's version).

pub mod connections;
pub mod cutover;
pub mod facts;
pub mod persistence;
pub mod served;
pub mod services;
