//! The Agent gRPC service: admits only the orchestrator, journals every mutating call, and
//! (on an origin) serves the data plane to targets holding a grant.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bmfleet_proto::admission::Limits;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{accept_tls_reserving, bounded_server, LocalIdentity, Policy, RoleGate};
use bmfleet_proto::v1::agent_server::{Agent, AgentServer};
use bmfleet_proto::v1::{
    ClearServedReply, ClearServedRequest, ConnectionReply, ConnectionRequest, CopyConfigReply,
    CopyConfigRequest, DumpFormat, EndFollowingReply, EndFollowingRequest, FactsReply,
    FactsRequest, FollowDatabasesReply, FollowDatabasesRequest, GrantReply, GrantRequest, IpReply,
    IpRequest, ManifestReply, ManifestRequest, MoveDatabasesReply, MoveDatabasesRequest,
    OriginEndpoint, PostMigrationReply, PostMigrationRequest, PullEvent, PullRequest,
    RevokeGrantRequest, ServiceAction, ServicesReply, ServicesRequest, VerifyFollowingReply,
    VerifyFollowingRequest,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::config::AgentConfig;
use crate::data_plane::DataPlane;
use crate::db::{databases, standby};
use crate::files::{config_copy, mail_queue, pull};
use crate::host::{connections, cutover, facts, served, services};
use crate::metrics::{AgentMetrics, Outcome};
use crate::operations::{once, once_unless, Journal};
use crate::plane::grants::now_ms;
use crate::plane::grants::{Grant, GrantStore};

/// File name of the agent's database (operation journal and grants) inside the state dir.
pub const JOURNAL_FILE: &str = "operations.db";

/// Why the agent could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Identity files unusable.
    #[error(transparent)]
    Tls(#[from] bmfleet_proto::tls::TlsError),
    /// The state dir could not be created.
    #[error("state dir {path}: {source}")]
    StateDir {
        /// The dir.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] crate::operations::JournalError),
    /// The grant store could not be opened.
    #[error(transparent)]
    Grants(#[from] crate::plane::grants::GrantStoreError),
    /// The data-plane listener could not be bound.
    #[error("cannot listen for the data plane on {address}: {source}")]
    DataListen {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("cannot serve metrics on {address}: {source}")]
    MetricsListen {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving the Agent API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The Agent API of one host.
pub struct AgentService {
    config: Arc<AgentConfig>,
    name: String,
    journal: Arc<Journal>,
    grants: Arc<GrantStore>,
    /// This agent's identity as a client of another agent's data plane (a target pulling).
    tunnel_tls: Arc<rustls::ClientConfig>,
    metrics: Arc<AgentMetrics>,
    /// Origin side: the change journals of the instances it serves.
    changes: Arc<crate::files::change_journal::ChangeJournals>,
    /// Target side: the relay of a standby that follows its origin.
    relay: Arc<standby::Relay>,
    /// The fleet's trust (roots less the revocation list, reloaded on SIGHUP).
    trust: Arc<bmfleet_proto::tls::TrustStore>,
}

fn origin_of(endpoint: Option<OriginEndpoint>) -> Result<OriginEndpoint, Status> {
    let origin = endpoint.ok_or_else(|| Status::invalid_argument("origin is required"))?;
    if origin.address.is_empty() || origin.name.is_empty() || origin.grant_id.is_empty() {
        return Err(Status::invalid_argument(
            "origin needs an address, a name and a grant_id",
        ));
    }
    Ok(origin)
}

impl AgentService {
    /// A service for `config`, answering as `identity`, keeping its journal and grants in
    /// the state dir.
    pub fn new(config: AgentConfig, identity: &LocalIdentity) -> Result<Self, AgentError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::StateDir {
            path: config.state_dir.display().to_string(),
            source,
        })?;
        // The agent's own state (journal, grants) is readable by root only.
        let state_err = |path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| AgentError::StateDir { path, source }
        };
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(state_err(&config.state_dir))?;
        }
        let db = config.state_dir.join(JOURNAL_FILE);
        bmfleet_proto::private_file(&db).map_err(state_err(&db))?;
        let journal = Journal::open(&db)?;
        let grants = GrantStore::open(&db)?;
        Ok(AgentService {
            config: Arc::new(config),
            name: identity.identity().name.clone(),
            journal: Arc::new(journal),
            grants: Arc::new(grants),
            tunnel_tls: identity.client_config(Role::Agent)?,
            metrics: Arc::new(AgentMetrics::new()),
            changes: Arc::default(),
            relay: Arc::default(),
            trust: identity.trust(),
        })
    }

    /// What must run again after a restart: the relay of a standby that follows its origin,
    /// and the removal of replication slots and roles whose grants are gone.
    pub fn resume(&self) {
        standby::resume(&self.config, self.tunnel_tls.clone(), &self.relay);
        self.clean_replication();
    }

    /// Removes (in the background) what replication grants that are gone left in the cluster.
    fn clean_replication(&self) {
        let (config, grants) = (self.config.clone(), self.grants.clone());
        tokio::spawn(async move {
            crate::db::leftovers::clean_leftovers(&config, &grants, now_ms()).await;
        });
    }

    /// This agent's metrics.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.metrics.clone()
    }

    /// The data plane of this agent, sharing its grants.
    pub fn data_plane(&self) -> Arc<DataPlane> {
        Arc::new(DataPlane {
            config: self.config.clone(),
            grants: self.grants.clone(),
            metrics: self.metrics.clone(),
            children: bmfleet_proto::admission::Admission::new(Limits::CHILDREN),
            relays: bmfleet_proto::admission::Admission::new(Limits::RELAYS),
            changes: self.changes.clone(),
            trust: self.trust.clone(),
        })
    }
}

/// The stream of a pull: progress events, then the final one.
pub type PullStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<PullEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn facts(&self, request: Request<FactsRequest>) -> Result<Response<FactsReply>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            facts::gather(&self.config, &self.name, req.measure_usage).await,
        ))
    }

    async fn services(
        &self,
        request: Request<ServicesRequest>,
    ) -> Result<Response<ServicesReply>, Status> {
        let req = request.into_inner();
        let action = ServiceAction::try_from(req.action)
            .ok()
            .filter(|a| *a != ServiceAction::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument("services: action must be STOP, START or STATUS")
            })?;
        if action == ServiceAction::Status {
            let mut reply = services::run(&self.config.services, action).await;
            reply.operation_id = req.operation_id;
            return Ok(Response::new(reply));
        }
        let kind = format!("services/{}", action.as_str_name());
        let (config, operation_id) = (self.config.clone(), req.operation_id.clone());
        let read_wal = req.wal_position;
        let run = async move {
            tracing::info!(operation_id = %operation_id, action = action.as_str_name(), "services");
            if action == ServiceAction::Start {
                // From the first start on, this host may take mail: it is never synced into
                // again without an operator's re-migration.
                if let Err(e) = served::set(&config.state_dir, &operation_id, now_ms()) {
                    return ServicesReply {
                        commands: vec![bmfleet_proto::v1::CommandResult {
                            service: "bmfleet".into(),
                            exit_code: -1,
                            error: format!("cannot record that this host serves: {e}"),
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                }
            }
            match action {
                // Mail Postfix accepted goes into Cyrus while both still run (bounded); the
                // rest is carried at cold sync.
                ServiceAction::Stop => {
                    // The session that reads the WAL position is started and connected while
                    // the services stop.
                    let (session, mut reply) = tokio::join!(
                        async {
                            if read_wal {
                                Some(
                                    crate::db::pg::Connection::admin(&config.postgresql)
                                        .warm_session("postgres")
                                        .await,
                                )
                            } else {
                                None
                            }
                        },
                        async {
                            let drained = mail_queue::drain(&config).await;
                            ServicesReply {
                                mail_queue: Some(drained),
                                ..services::run(&config.services, action).await
                            }
                        }
                    );
                    // Nothing writes any more: the position a follower must reach, read here
                    // and now rather than asked by the target once the downtime's steps run.
                    if reply.ok && read_wal {
                        let read = match session {
                            Some(Ok(session)) => {
                                crate::db::wal::wal_position_on(&config, session).await
                            }
                            _ => crate::db::wal::wal_position(&config).await,
                        };
                        match read {
                            Ok(p) => {
                                reply.wal_position = Some(bmfleet_proto::v1::WalPosition {
                                    lsn: p.lsn,
                                    segment_size: p.segment_size,
                                })
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "the WAL position after the stop could not be read: the follower will ask")
                            }
                        }
                    }
                    reply
                }
                // Start: carried mail deferred on the origin is tried now, not after its
                // back-off.
                _ => {
                    let mut reply = services::run(&config.services, action).await;
                    if reply.ok {
                        reply.mail_queue = Some(mail_queue::flush(&config).await);
                    }
                    reply
                }
            }
        };
        self.journaled(&req.operation_id, &kind, &req.encode_to_vec(), run)
            .await
    }

    async fn grant(&self, request: Request<GrantRequest>) -> Result<Response<GrantReply>, Status> {
        let req = request.into_inner();
        let grant =
            Grant::from_request(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(reason) = grant
            .paths
            .iter()
            .find_map(|p| self.config.refuse_data_path(p))
        {
            return Err(Status::permission_denied(format!(
                "grant {} refused: {reason}",
                grant.id
            )));
        }
        if self.config.data_listen.is_none() {
            return Err(Status::failed_precondition(
                "this agent has no data_listen address: it serves no pulls",
            ));
        }
        self.grants
            .purge_expired(now_ms())
            .and_then(|_| self.grants.put(&grant))
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(grant = %grant.id, target = %grant.target_name, migration = %grant.migration, paths = ?grant.paths, "grant registered");
        self.clean_replication();
        if !grant.paths.is_empty() {
            // From the first pass on, the instance's changes are journaled (the final pass
            // moves only those).
            let roots = grant
                .paths
                .iter()
                .map(|p| self.config.host_path(p))
                .collect();
            let changes = self.changes.clone();
            let key = crate::files::change_journal::key(&grant.migration, &grant.target_name);
            let _ = tokio::task::spawn_blocking(move || changes.ensure(&key, roots)).await;
        }
        Ok(Response::new(GrantReply {
            grant_id: grant.id,
            revoked: 0,
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<GrantReply>, Status> {
        let req = request.into_inner();
        let revoked = if req.grant_id.is_empty() {
            if req.target_name.is_empty() || req.migration.is_empty() {
                return Err(Status::invalid_argument(
                    "name a grant_id, or both target_name and migration",
                ));
            }
            self.grants
                .revoke_issued(&req.target_name, &req.migration)
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            usize::from(
                self.grants
                    .revoke(&req.grant_id)
                    .map_err(|e| Status::internal(e.to_string()))?,
            )
        };
        if req.grant_id.is_empty() {
            // The instance ended: its journal stops.
            self.changes.stop(&crate::files::change_journal::key(
                &req.migration,
                &req.target_name,
            ));
        }
        tracing::info!(grant = %req.grant_id, target = %req.target_name, migration = %req.migration, revoked, "grants revoked");
        self.clean_replication();
        Ok(Response::new(GrantReply {
            grant_id: req.grant_id,
            revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }

    type PullStream = PullStream;

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullStream>, Status> {
        let req = request.into_inner();
        let origin = origin_of(req.origin.clone())?;
        let paths = if req.paths.is_empty() {
            vec![req.path.clone()]
        } else {
            req.paths.clone()
        };
        for p in &paths {
            let path = crate::files::rsync_args::clean_absolute(p)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if let Some(reason) = self.config.refuse_data_path(&path) {
                return Err(Status::permission_denied(format!("pull refused: {reason}")));
            }
        }
        let how = pull::PassOptions {
            bwlimit_kib: req.bwlimit_kib,
            compress: req.compress,
            journal_since: req.journal_since.clone(),
            carry_since: req.carry_since.clone(),
            first_pass: req.first_pass,
            tls: Some(self.tunnel_tls.clone()),
        };
        let (tx, rx) = mpsc::channel::<Result<PullEvent, Status>>(16);
        let (config, journal) = (self.config.clone(), self.journal.clone());
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let (progress_tx, mut progress_rx) = mpsc::channel::<PullEvent>(16);
            let forward_tx = tx.clone();
            // Forward progress; when the caller goes away, drop the progress receiver so that
            // the pull sees it and kills rsync.
            let forward = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        event = progress_rx.recv() => match event {
                            Some(e) => { let _ = forward_tx.send(Ok(e)).await; }
                            None => break,
                        },
                        _ = forward_tx.closed() => break,
                    }
                }
            });
            let counted = metrics.clone();
            let run = async {
                if let Err(error) = served::refuse_sync(&config.state_dir, "a pull") {
                    counted.count("pull", Outcome::Refused);
                    return PullEvent {
                        done: true,
                        error,
                        ..Default::default()
                    };
                }
                let running = counted.start("pull");
                let event = pull::pull(&config, &origin, &paths, how, &progress_tx).await;
                if let (true, Some(s)) = (event.ok, &event.stats) {
                    counted.pulled(s.files_changed, s.bytes_changed);
                }
                running.end(event.ok);
                event
            };
            // A pull cut short because its caller went away is not remembered: the caller's
            // identical request (an orchestrator re-attaching after a restart) runs it again.
            let result = once_unless(
                &journal,
                &req.operation_id,
                "pull",
                &req.encode_to_vec(),
                now_ms,
                run,
                |event: &PullEvent| event.error == pull::CANCELLED,
            )
            .await;
            drop(progress_tx);
            let _ = forward.await;
            match &result {
                Ok((_, true)) => metrics.count("pull", Outcome::Replayed),
                Err(_) => metrics.count("pull", Outcome::Refused),
                Ok(_) => {}
            }
            let _ = tx
                .send(result.map(|(mut event, replayed)| {
                    event.replayed = replayed;
                    event
                }))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_databases(
        &self,
        request: Request<MoveDatabasesRequest>,
    ) -> Result<Response<MoveDatabasesReply>, Status> {
        let req = request.into_inner();
        let origin = origin_of(req.origin.clone())?;
        let format = DumpFormat::try_from(req.format).unwrap_or(DumpFormat::Streamed);
        let (promote, known, jobs) = (req.promote, req.origin_wal_position.clone(), req.jobs);
        let (config, tls, relay) = (
            self.config.clone(),
            self.tunnel_tls.clone(),
            self.relay.clone(),
        );
        let run = async move {
            if let Err(error) = served::refuse_sync(&config.state_dir, "moving databases") {
                return MoveDatabasesReply {
                    error,
                    ..Default::default()
                };
            }
            if promote {
                crate::db::follower::promote(&config, tls, &relay, &origin, known.as_ref()).await
            } else {
                databases::move_databases(&config, tls, &origin, format, jobs).await
            }
        };
        // The origin's stop position is a hint (without it the origin is asked): the same
        // operation sent again without it (an orchestrator restarted since) is the same one.
        let fingerprint = MoveDatabasesRequest {
            origin_wal_position: None,
            ..req.clone()
        }
        .encode_to_vec();
        self.journaled(&req.operation_id, "move_databases", &fingerprint, run)
            .await
    }

    async fn follow_databases(
        &self,
        request: Request<FollowDatabasesRequest>,
    ) -> Result<Response<FollowDatabasesReply>, Status> {
        let req = request.into_inner();
        let origin = origin_of(req.origin.clone())?;
        let (config, tls, relay) = (
            self.config.clone(),
            self.tunnel_tls.clone(),
            self.relay.clone(),
        );
        let run = async move {
            if let Err(error) = served::refuse_sync(&config.state_dir, "following databases") {
                return FollowDatabasesReply {
                    error,
                    ..Default::default()
                };
            }
            if req.logical {
                crate::db::subscription::follow(&config, tls, &relay, &origin).await
            } else {
                standby::follow(&config, tls, &relay, &origin).await
            }
        };
        self.journaled(
            &req.operation_id,
            "follow_databases",
            &req.encode_to_vec(),
            run,
        )
        .await
    }

    async fn end_following(
        &self,
        request: Request<EndFollowingRequest>,
    ) -> Result<Response<EndFollowingReply>, Status> {
        let req = request.into_inner();
        let reply =
            match crate::db::follower::end_following(&self.config, &self.relay, &req.origin_name)
                .await
            {
                Ok(ended) => EndFollowingReply {
                    ended,
                    error: String::new(),
                },
                Err(error) => EndFollowingReply {
                    ended: false,
                    error,
                },
            };
        Ok(Response::new(reply))
    }

    async fn verify_following(
        &self,
        request: Request<VerifyFollowingRequest>,
    ) -> Result<Response<VerifyFollowingReply>, Status> {
        let req = request.into_inner();
        let started = std::time::Instant::now();
        // The downtime may follow the point: its catch-up watch and its gate's tables read
        // on sessions started now, while the point is taken (not after it, in the downtime),
        // and the promotion's last statements on an administrator's.
        let owner = crate::db::pg::Connection::owner(&self.config.postgresql);
        let admin = crate::db::pg::Connection::admin(&self.config.postgresql);
        tokio::spawn(async move {
            owner.warm("postgres", 2).await;
            admin.warm("postgres", 1).await;
        });
        let outcome = match crate::db::follow::following(&self.config) {
            Some(state) if state.name == req.origin_name && state.logical.is_some() => {
                crate::db::gate::block_point::establish(
                    &self.config,
                    self.tunnel_tls.clone(),
                    state,
                )
                .await
            }
            Some(state) if state.name == req.origin_name => {
                crate::db::gate::verified_point::establish(&self.config, self.tunnel_tls.clone())
                    .await
            }
            Some(state) => Err(format!(
                "this host follows {}, not {}",
                state.name, req.origin_name
            )),
            None => Err(format!("this host does not follow {}", req.origin_name)),
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let reply = match outcome {
            Ok(summary) => {
                tracing::info!(origin = %req.origin_name, %summary, "verified point taken");
                VerifyFollowingReply {
                    ok: true,
                    summary,
                    elapsed_ms,
                    ..Default::default()
                }
            }
            Err(error) => {
                tracing::warn!(origin = %req.origin_name, %error, "no verified point");
                VerifyFollowingReply {
                    error,
                    elapsed_ms,
                    ..Default::default()
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn post_migration(
        &self,
        request: Request<PostMigrationRequest>,
    ) -> Result<Response<PostMigrationReply>, Status> {
        let req = request.into_inner();
        let config = self.config.clone();
        let encoded = req.encode_to_vec();
        let id = req.operation_id.clone();
        let run = async move {
            let version = facts::bluemind_version(&config).await;
            tokio::task::spawn_blocking(move || {
                crate::bluemind::post_migration::run(&config, &req, &version)
            })
            .await
            .unwrap_or_else(|e| PostMigrationReply {
                error: format!("post-migration task: {e}"),
                ..Default::default()
            })
        };
        self.journaled(&id, "post_migration", &encoded, run).await
    }

    async fn manifest(
        &self,
        request: Request<ManifestRequest>,
    ) -> Result<Response<ManifestReply>, Status> {
        let req = request.into_inner();
        let config = self.config.clone();
        let paths: Vec<String> = if req.paths.is_empty() {
            config
                .all_data_dirs()
                .map(|p| p.display().to_string())
                .collect()
        } else {
            req.paths
        };
        for p in &paths {
            crate::files::rsync_args::clean_absolute(p)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let (list, since) = (req.entries, req.content_since_unix_ms);
        let dirs = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| {
                    crate::files::manifest::of_dir(
                        p,
                        &config.host_path(std::path::Path::new(p)),
                        &[crate::files::pull::PARTIAL_DIR],
                        list,
                        since,
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::internal)?;
        Ok(Response::new(ManifestReply { dirs }))
    }

    async fn release_ip(&self, request: Request<IpRequest>) -> Result<Response<IpReply>, Status> {
        self.ip(request.into_inner(), false).await
    }

    async fn take_ip(&self, request: Request<IpRequest>) -> Result<Response<IpReply>, Status> {
        self.ip(request.into_inner(), true).await
    }

    async fn copy_config(
        &self,
        request: Request<CopyConfigRequest>,
    ) -> Result<Response<CopyConfigReply>, Status> {
        let req = request.into_inner();
        let origin = origin_of(req.origin.clone())?;
        let (config, tls) = (self.config.clone(), self.tunnel_tls.clone());
        let run = async move {
            if let Err(error) = served::refuse_sync(&config.state_dir, "copying the configuration")
            {
                return CopyConfigReply {
                    error,
                    ..Default::default()
                };
            }
            if req.stage {
                config_copy::stage(&config, &origin).await
            } else {
                config_copy::copy(&config, tls, &origin, req.origin_queue_empty).await
            }
        };
        // Whether the origin's queue was empty is a hint (without it the queue is pulled):
        // the same operation sent again without it (an orchestrator restarted since) is the
        // same one.
        let fingerprint = CopyConfigRequest {
            origin_queue_empty: false,
            ..req.clone()
        }
        .encode_to_vec();
        self.journaled(&req.operation_id, "copy_config", &fingerprint, run)
            .await
    }

    async fn clear_served(
        &self,
        request: Request<ClearServedRequest>,
    ) -> Result<Response<ClearServedReply>, Status> {
        let req = request.into_inner();
        let was = served::clear(&self.config.state_dir)
            .map_err(|e| Status::internal(format!("cannot clear the served marker: {e}")))?;
        tracing::warn!(operation_id = %req.operation_id, reason = %req.reason, was = ?was, "served marker cleared: this host may be synced into again");
        Ok(Response::new(ClearServedReply {
            was_set: was.is_some(),
            since_unix_ms: was.as_ref().map_or(0, |m| m.since_ms),
            set_by: was.map(|m| m.operation_id).unwrap_or_default(),
        }))
    }

    async fn connection(
        &self,
        request: Request<ConnectionRequest>,
    ) -> Result<Response<ConnectionReply>, Status> {
        let req = request.into_inner();
        let parse = |what: &str, text: &str| {
            text.parse::<std::net::SocketAddr>().map_err(|e| {
                Status::invalid_argument(format!("connection: {what} `{text}` is not ip:port: {e}"))
            })
        };
        let (local, remote) = (parse("local", &req.local)?, parse("remote", &req.remote)?);
        let state = connections::held(local, remote)
            .map_err(|e| Status::internal(format!("cannot read this host's TCP table: {e}")))?;
        Ok(Response::new(ConnectionReply {
            held: state.is_some(),
            state: state.unwrap_or_default(),
        }))
    }
}

/// A reply that says which operation it answers and whether it was replayed.
trait Journaled {
    fn mark(&mut self, operation_id: &str, replayed: bool);
    fn ok(&self) -> bool;
}

macro_rules! journaled {
    ($($reply:ty),*) => {$(
        impl Journaled for $reply {
            fn mark(&mut self, operation_id: &str, replayed: bool) {
                self.operation_id = operation_id.to_string();
                self.replayed = replayed;
            }
            fn ok(&self) -> bool {
                self.ok
            }
        }
    )*};
}

journaled!(
    ServicesReply,
    MoveDatabasesReply,
    FollowDatabasesReply,
    CopyConfigReply,
    PostMigrationReply,
    IpReply
);

impl AgentService {
    /// Runs `run` once per operation id (see [`once`]) and marks the reply with its id.
    /// The operation runs in a task of its own: a caller that goes away (an orchestrator
    /// killed mid-step) does not cut it short; its identical request, sent again, waits for it
    /// and gets its reply from the journal.
    async fn journaled<R: Message + Default + Journaled + Send + 'static>(
        &self,
        id: &str,
        kind: &str,
        encoded: &[u8],
        run: impl Future<Output = R> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        // The journal's kind may carry details ("services/…"): the metric keeps the family.
        let family = kind.split('/').next().unwrap_or(kind).to_string();
        let counted = {
            let (metrics, family) = (self.metrics.clone(), family.clone());
            async move {
                let running = metrics.start(&family);
                let reply = run.await;
                running.end(reply.ok());
                reply
            }
        };
        let (journal, owned_id, owned_kind, owned_encoded) = (
            self.journal.clone(),
            id.to_string(),
            kind.to_string(),
            encoded.to_vec(),
        );
        let task = tokio::spawn(async move {
            once(
                &journal,
                &owned_id,
                &owned_kind,
                &owned_encoded,
                now_ms,
                counted,
            )
            .await
        });
        let (mut reply, replayed) = task
            .await
            .map_err(|e| Status::internal(format!("{kind} {id}: {e}")))?
            .inspect_err(|_| self.metrics.count(&family, Outcome::Refused))?;
        if replayed {
            self.metrics.count(&family, Outcome::Replayed);
        }
        reply.mark(id, replayed);
        Ok(Response::new(reply))
    }

    async fn ip(&self, req: IpRequest, take: bool) -> Result<Response<IpReply>, Status> {
        let kind = if take { "take_ip" } else { "release_ip" };
        let encoded = req.encode_to_vec();
        let config = self.config.clone();
        let run = async move {
            if take {
                cutover::take(&config, &req.address, &req.interface).await
            } else {
                cutover::release(&config, &req.address, &req.interface).await
            }
        };
        self.journaled(&req.operation_id, kind, &encoded, run).await
    }
}

/// Serves the Agent API on `listener` (and the data plane on `data_listen`, when configured)
/// until `shutdown` completes.
pub async fn serve(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let identity = LocalIdentity::load(&config.tls, Role::Agent)?;
    let tls = identity.server_config()?;
    bmfleet_proto::process::reload_on_sighup(identity.trust());
    let (data_listen, metrics_listen) = (config.data_listen, config.metrics_listen);
    let orchestrators = config.orchestrators.clone();
    let reserved = config.orchestrator_addresses.clone();
    let service = AgentService::new(config, &identity)?;
    service.resume();
    if let Some(address) = metrics_listen {
        let bound = crate::metrics::serve(service.metrics(), address).map_err(|source| {
            AgentError::MetricsListen {
                address: address.to_string(),
                source,
            }
        })?;
        tracing::info!(address = %bound, "metrics serving");
    }
    let data_plane = match data_listen {
        Some(address) => {
            let data_listener =
                TcpListener::bind(address)
                    .await
                    .map_err(|source| AgentError::DataListen {
                        address: address.to_string(),
                        source,
                    })?;
            tracing::info!(address = ?data_listener.local_addr().ok(), "data plane serving");
            Some(tokio::spawn(
                service.data_plane().serve(data_listener, tls.clone()),
            ))
        }
        None => None,
    };
    let name = identity.identity().name.clone();
    tracing::info!(agent = %name, address = ?listener.local_addr().ok(), "agent serving");
    let gate = RoleGate {
        allowed: Role::Orchestrator,
        api: "Agent API",
        names: Arc::new(orchestrators),
    };
    let served = bounded_server()
        .add_service(AgentServer::with_interceptor(service, gate))
        .serve_with_incoming_shutdown(
            accept_tls_reserving(
                listener,
                tls,
                Policy {
                    limits: Limits::API,
                    role: Some(Role::Orchestrator),
                },
                reserved,
            ),
            shutdown,
        )
        .await;
    if let Some(plane) = data_plane {
        plane.abort();
    }
    served?;
    Ok(())
}
