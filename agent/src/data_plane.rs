//! The origin's data plane listener: serves target agents, each request admitted by a grant.
//!
//! Every connection is mutual TLS under the fleet CA; the caller must hold an agent
//! certificate whose name is the grant's target. The trust boundary of every verb is here,
//! in one place: [`verb`] is the table from a request to the grant scope it needs and the
//! pool that admits it, and [`DataPlane::answer`] hands it to the room that owns it
//! ([`crate::files::serve`], [`crate::db::serve`], the gate's own handlers). Handlers check
//! only their request's content (rsync's argv, a database's name, paths inside the grant).

use std::sync::Arc;
use std::time::Duration;

use bmfleet_proto::admission::{Admission, Limits};
use bmfleet_proto::identity::{peer_identity, Role};
use bmfleet_proto::tls::{accept_tls, Policy, TrustStore};
use rustls::pki_types::CertificateDer;
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::config::AgentConfig;
use crate::db::gate::{block_point, verified_point};
use crate::files::change_journal::ChangeJournals;
use crate::plane::answer::{refuse, Connection, Stream};
use crate::plane::grants::{now_ms, AdmitError, Grant, GrantStore, Scope};
use crate::plane::tunnel::{read_json_line, TunnelRequest};

/// How long a client has to send its request line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the data plane needs.
pub struct DataPlane {
    /// The agent's configuration.
    pub config: Arc<AgentConfig>,
    /// The grants.
    pub grants: Arc<GrantStore>,
    /// The agent's metrics (tunnel requests served and refused).
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    /// rsync and pg_dump children running, in all and per grant.
    pub children: Admission<String>,
    /// Replication connections relayed, in all and per grant.
    pub relays: Admission<String>,
    /// The change journals of the instances this origin serves.
    pub changes: Arc<ChangeJournals>,
    /// The fleet's trust, as in force now: a relay ends when its target's certificate is
    /// revoked.
    pub trust: Arc<TrustStore>,
}

/// How often a relayed connection checks that its grant and its target's certificate hold.
const RELAY_CHECK: Duration = Duration::from_millis(500);

/// Which admission pool a verb's connection counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// One child (rsync, pg_dump, pg_basebackup) or a query for the request's length.
    Children,
    /// A replication connection relayed for as long as the standby or subscriber follows.
    Relays,
}

/// What a verb needs: one of these grant scopes, and a slot in its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verb {
    /// The grant must cover one of these.
    pub scopes: &'static [Scope],
    /// The pool that admits the connection.
    pub pool: Pool,
}

/// The table of verbs: every request the data plane answers, with the grant scope it
/// needs and the pool that admits it.
pub fn verb(request: &TunnelRequest) -> Verb {
    use Pool::*;
    use Scope::*;
    let (scopes, pool): (&'static [Scope], Pool) = match request {
        // Which one of the two is checked against rsync's argv by the handler.
        TunnelRequest::Rsync { .. } => (&[DataDirs, ConfigSet], Children),
        TunnelRequest::Changes { .. } => (&[DataDirs], Children),
        TunnelRequest::ConfigManifest { .. } => (&[ConfigSet], Children),
        // A subscriber's schema comes under its replication grant; data only under databases.
        TunnelRequest::DumpDatabase {
            schema_only: true, ..
        } => (&[Databases, Replication], Children),
        TunnelRequest::DumpDatabase { .. } => (&[Databases], Children),
        TunnelRequest::DatabaseManifest { .. } => (&[Databases], Children),
        TunnelRequest::BaseBackup { .. } => (&[Replication], Children),
        TunnelRequest::Publish { .. } => (&[Replication], Children),
        TunnelRequest::Replication { .. } => (&[Replication], Relays),
        TunnelRequest::WalPosition { .. } => (&[Databases, Replication], Children),
        TunnelRequest::VerifiedPoint { .. } => (&[Replication], Children),
        TunnelRequest::ChangedTotals { .. } => (&[Databases], Children),
        TunnelRequest::ChangedBlocks { .. } => (&[Databases], Children),
    };
    Verb { scopes, pool }
}

impl DataPlane {
    /// Serves the data plane on `listener` with the agent's TLS server configuration.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let mut incoming = accept_tls(
            listener,
            tls,
            Policy {
                limits: Limits::API,
                role: None,
            },
        );
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let plane = self.clone();
            tokio::spawn(async move { plane.handle(conn).await });
        }
    }

    async fn handle(&self, conn: Connection) {
        let peer = conn.get_ref().get_ref().0.peer_addr().ok();
        crate::plane::tunnel::keep_alive(conn.get_ref().get_ref().0);
        let chain: Vec<CertificateDer<'static>> = conn
            .get_ref()
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let caller = chain.first().map(peer_identity);
        let mut stream = BufReader::new(conn);
        let request: TunnelRequest =
            match tokio::time::timeout(HEADER_TIMEOUT, read_json_line(&mut stream)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(?peer, error = %e, "data plane: bad request line");
                    self.metrics.tunnel("unknown", "refused");
                    let _ = refuse(&mut stream, format!("bad request line: {e}")).await;
                    return;
                }
                Err(_) => return,
            };
        let kind = request.kind();
        let caller = match caller {
            Some(Ok(id)) if id.role == Role::Agent => id,
            Some(Ok(id)) => {
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, format!("certificate {id} is not an agent's")).await;
                return;
            }
            _ => {
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, "no usable client certificate".into()).await;
                return;
            }
        };
        let grant_id = request.grant().to_string();
        let grant = match self.grants.admit(&grant_id, &caller.name, now_ms()) {
            Ok(g) => g,
            Err(e) => {
                if let AdmitError::Store(_) = e {
                    tracing::error!(error = %e, "grant store failed");
                }
                tracing::warn!(?peer, caller = %caller, error = %e, "data plane: refused");
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, e.to_string()).await;
                return;
            }
        };
        // The verb's scope, before anything runs or is admitted.
        let verb = verb(&request);
        if let Err(e) = grant.require_any(verb.scopes) {
            tracing::warn!(?peer, caller = %caller, grant = %grant.id, error = %e, "data plane: refused");
            self.metrics.tunnel(kind, "refused");
            let _ = refuse(&mut stream, e.to_string()).await;
            return;
        }
        // Each request runs one child (rsync, pg_dump) or a query: bounded per grant and in all.
        let admission = match verb.pool {
            Pool::Relays => &self.relays,
            Pool::Children => &self.children,
        };
        let _child = match admission.admit(grant.id.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(?peer, caller = %caller, grant = %grant.id, reason = %e, "data plane: too many transfers");
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, format!("busy: {e}; retry later")).await;
                return;
            }
        };
        // A relay lasts as long as its grant and its target's certificate, not longer.
        let outcome = match verb.pool {
            Pool::Children => self.answer(&grant, request, &mut stream).await,
            Pool::Relays => tokio::select! {
                outcome = self.answer(&grant, request, &mut stream) => outcome,
                why = self.lapsed(&grant, &caller.name, &chain) => {
                    tracing::warn!(?peer, caller = %caller.name, grant = %grant.id, %why, "data plane: relay closed");
                    self.metrics.tunnel(kind, "closed");
                    return;
                }
            },
        };
        match outcome {
            Ok(()) => {
                self.metrics.tunnel(kind, "served");
                tracing::info!(?peer, caller = %caller.name, grant = %grant.id, "data plane: served")
            }
            Err(reason) => {
                self.metrics.tunnel(kind, "failed");
                tracing::warn!(?peer, caller = %caller.name, grant = %grant.id, %reason, "data plane: refused or failed");
                let _ = refuse(&mut stream, reason).await;
            }
        }
    }

    /// Returns (why) once `grant` no longer admits `caller` (revoked, expired) or the
    /// caller's certificate is no longer trusted (revoked by a reloaded list, expired).
    async fn lapsed(
        &self,
        grant: &Grant,
        caller: &str,
        chain: &[CertificateDer<'static>],
    ) -> String {
        loop {
            tokio::time::sleep(RELAY_CHECK).await;
            match self.grants.admit(&grant.id, caller, now_ms()) {
                Err(AdmitError::Refused(e)) => return format!("the grant no longer holds ({e})"),
                Err(AdmitError::Store(e)) => {
                    tracing::error!(error = %e, "grant store failed while checking a relay")
                }
                Ok(_) => {}
            }
            if !self.trust.still_trusts_client(chain) {
                return format!("{caller}'s certificate is no longer trusted (revoked or expired)");
            }
        }
    }

    /// Hands an admitted request, inside its grant's scope, to the room that owns its verb.
    async fn answer(
        &self,
        grant: &Grant,
        request: TunnelRequest,
        stream: &mut Stream,
    ) -> Result<(), String> {
        use crate::db::serve as db;
        use crate::files::serve as files;
        let config = &self.config;
        match request {
            TunnelRequest::Rsync {
                argv,
                journal_since,
                ..
            } => files::rsync(config, &self.changes, grant, &argv, &journal_since, stream).await,
            TunnelRequest::Changes {
                since, manifest, ..
            } => files::changes(config, &self.changes, grant, &since, manifest, stream).await,
            TunnelRequest::ConfigManifest { .. } => {
                files::config_manifest(config, grant, stream).await
            }
            TunnelRequest::DumpDatabase {
                database,
                schema_only,
                ..
            } => db::dump(config, &database, schema_only, stream).await,
            TunnelRequest::DatabaseManifest { names_only, .. } => {
                db::manifest(config, names_only, stream).await
            }
            TunnelRequest::BaseBackup { .. } => {
                db::base_backup(config, &self.grants, grant, stream).await
            }
            TunnelRequest::Publish { .. } => db::publish(config, &self.grants, grant, stream).await,
            TunnelRequest::Replication { .. } => {
                db::relay(config, &self.grants, grant, stream).await
            }
            TunnelRequest::WalPosition { .. } => db::wal_position(config, stream).await,
            TunnelRequest::VerifiedPoint { per_block, .. } => {
                // The stop may follow the point: the position read at it and the gate's
                // queries run on sessions started now, while the point's sums run (not
                // after them, beside the stop).
                let bluemind = crate::db::pg::Connection::bluemind_here(config);
                let (admin, warmed) = (
                    crate::db::pg::Connection::admin(&config.postgresql),
                    bluemind.clone(),
                );
                tokio::spawn(async move {
                    admin.warm("postgres", 2).await;
                    warmed.warm("postgres", 1).await;
                });
                db::verified_point(config, &bluemind, &grant.id, per_block, stream).await
            }
            TunnelRequest::ChangedTotals { since, .. } => {
                block_point::serve_totals(
                    config,
                    &crate::db::pg::Connection::bluemind_here(config),
                    &since,
                    stream,
                )
                .await
            }
            TunnelRequest::ChangedBlocks { since, tables, .. } => {
                verified_point::serve_changed(
                    config,
                    &crate::db::pg::Connection::bluemind_here(config),
                    &since,
                    &tables,
                    stream,
                )
                .await
            }
        }
    }
}
