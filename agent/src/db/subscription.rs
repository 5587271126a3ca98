//! The target's side of logical replication: during the hot phase each BlueMind database here
//! subscribes to the origin's publication (across PostgreSQL majors: a distribution change
//! usually is one); at the cutover it catches up, takes the origin's sequence values and
//! stops subscribing, so the downtime holds no dump and no restore.
//!
//! Following: the origin publishes (`publication`), the target sets its own databases aside
//! (renamed `<name>.bmfleet-target`, put back if the instance ends without a promotion),
//! re-creates them owned by BlueMind's role with the extensions of its own list, restores the
//! origin's *schema* as that role (pg_restore, as for a dump), and subscribes. The
//! subscription belongs to a role of its own, `bmfleet_sub_<grant>` (LOGIN without a password:
//! its workers log in as it): a member of BlueMind's role and nothing more (PostgreSQL 16 on: `pg_create_subscription`; before it, the role is a
//! superuser only while `CREATE SUBSCRIPTION` runs, disabled, and loses it before the
//! subscription is enabled). Its apply workers therefore run the origin's rows, triggers and
//! constraints as BlueMind's role, never as a superuser. The statements the agent runs in a
//! database that came from the origin run as that role or the subscription's, with
//! `search_path` pinned to `pg_catalog`. The subscription connects to the agent's relay (the
//! physical standby's), which reaches the origin through the data plane under the grant.
//!
//! Promoting (origin stopped): the origin's WAL insert position; every table ready and every
//! subscription's reported position at or past it; the subscriptions disabled, detached from
//! their slot (the origin drops it with the grant) and dropped; the origin's sequence values
//! set; the set-aside databases dropped; every table compared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bmfleet_proto::v1::{DatabaseMove, FollowDatabasesReply, OriginEndpoint};

use crate::config::AgentConfig;
use crate::db::compare::ManifestReply;
use crate::db::follow::{progress, Following, LogicalFollow, Progress};
use crate::db::pg::{ident, literal, Connection};
use crate::db::publication::PublishTicket;
use crate::db::standby::{self, Relay};
use crate::plane::tunnel::{self, TunnelRequest};

/// A database's name while the target's own copy is set aside.
fn aside_name(database: &str) -> String {
    format!("{database}.bmfleet-target")
}

/// The subscription role's and a subscription's names for a grant.
fn names(grant_id: &str, database_index: usize) -> (String, String) {
    let (role, _) = crate::db::wal::names(grant_id);
    let id = role.trim_start_matches("bmfleet_repl_").to_string();
    (
        format!("bmfleet_sub_{id}"),
        format!("bmfleet_sub_{id}_{database_index}"),
    )
}

/// Subscribes this host's BlueMind databases to the origin's publications (grant with the
/// replication scope). Never fails as a call.
pub async fn follow(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
) -> FollowDatabasesReply {
    crate::db::follow::follow_reply(
        Instant::now(),
        follow_inner(config, tls, relay, origin).await,
    )
}

async fn follow_inner(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
) -> Result<u64, String> {
    match crate::db::follow::following(config) {
        Some(state) if state.logical.is_none() && !state.promoted => {
            return Err(format!(
                "this host's cluster is a standby of {}: it cannot subscribe as well",
                state.name
            ))
        }
        // A previous attempt's subscriptions go first (their databases stay set aside), then
        // its role (its name is its grant's: a retried step has another), the owner's
        // attributes put back as that attempt found them.
        Some(state) if !state.promoted => {
            if let Some(previous) = &state.logical {
                unsubscribe(config, &state).await?;
                drop_role(config, previous).await?;
            }
        }
        _ => {}
    }
    let pg = &config.postgresql;
    let admin = Connection::admin(pg);
    let own_version = admin
        .server_version_num()
        .await
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::Publish {
        grant: origin.grant_id.clone(),
    };
    let (_, ticket): (_, PublishTicket) = tunnel::ask(
        origin,
        tls.clone(),
        &request,
        timeout,
        "the origin's publication ticket",
    )
    .await?;
    if crate::db::wal::major(own_version) < crate::db::wal::major(ticket.server_version_num) {
        return Err(format!(
            "the origin runs PostgreSQL {} and this host {}: a subscriber must be the same \
             major or newer",
            crate::db::wal::major(ticket.server_version_num),
            crate::db::wal::major(own_version)
        ));
    }
    // The target's own names; the origin only says which of them it publishes.
    let databases: Vec<(usize, &crate::db::publication::PublishedDatabase)> = pg
        .databases
        .iter()
        .filter_map(|d| ticket.databases.iter().find(|p| &p.name == d))
        .enumerate()
        .collect();
    let (role, _) = names(&origin.grant_id, 0);
    // A password nobody knows until the promotion sets the origin's (the databases grant's
    // manifest carries it): the replication ticket never does.
    let verifier = crate::db::pg::scram_verifier(&crate::db::replication::random_password()?)?;
    let owner_attributes = crate::db::databases::prepare_owner(&admin, &pg.user, &verifier).await?;
    let state = Following {
        address: origin.address.clone(),
        name: origin.name.clone(),
        grant_id: origin.grant_id.clone(),
        promoted: false,
        logical: Some(LogicalFollow {
            role: role.clone(),
            subscriptions: databases
                .iter()
                .map(|(n, d)| (d.name.clone(), names(&origin.grant_id, *n).1))
                .collect(),
            owner_attributes,
        }),
        verified: None,
    };
    // Recorded first: whatever happens next, the instance's end undoes it.
    crate::db::follow::set_following(config, Some(&state))?;
    let subscribed = async {
        let mut schema_bytes = 0;
        for (_, db) in &databases {
            set_aside(&admin, &db.name).await?;
            let extensions: Vec<(String, String)> = ticket
                .extensions
                .iter()
                .filter(|e| e.database == db.name)
                .map(|e| (e.name.clone(), e.schema.clone()))
                .collect();
            crate::db::databases::recreate(config, &db.name, &extensions).await?;
            schema_bytes += restore_schema(config, tls.clone(), origin, &db.name).await?;
        }
        relay.start(config, tls.clone(), &state)?;
        subscribe(config, &state, &ticket, own_version).await?;
        wait_ready(config, &state, own_version).await?;
        Ok::<u64, String>(schema_bytes)
    }
    .await;
    match subscribed {
        Ok(bytes) => {
            tracing::info!(origin = %origin.name, databases = databases.len(), "the databases subscribe to the origin's");
            Ok(bytes)
        }
        Err(error) => Err(match end(config, relay, &state).await {
            Ok(()) => format!("{error} (this host's databases are back as they were)"),
            Err(e) => format!("{error}; putting this host's databases back failed: {e}"),
        }),
    }
}

/// The target's own database set aside (renamed) the first time; on a later attempt the
/// set-aside one is the target's own and the database here a previous copy, which
/// [`crate::db::databases::recreate`] replaces.
async fn set_aside(admin: &Connection, database: &str) -> Result<(), String> {
    let (db, aside) = (literal(database), literal(&aside_name(database)));
    let sql = format!(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE datname = {db} AND pid <> pg_catalog.pg_backend_pid();\n\
         DO $$ BEGIN\n\
           IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = {aside})\n\
              AND EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = {db}) THEN\n\
             EXECUTE 'ALTER DATABASE ' || pg_catalog.quote_ident({db}) || ' RENAME TO ' || pg_catalog.quote_ident({aside});\n\
           END IF;\n\
         END $$;\n"
    );
    let mut last = String::new();
    for _ in 0..20 {
        match admin.psql("postgres", &sql).await {
            Ok(_) => return Ok(()),
            // A BlueMind service of this host reconnected between the two statements.
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("setting {database} aside: {last}"))
}

/// Restores the origin's schema of `database` as the owner role (as a dump is restored).
async fn restore_schema(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    database: &str,
) -> Result<u64, String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::DumpDatabase {
        grant: origin.grant_id.clone(),
        database: database.to_string(),
        schema_only: true,
    };
    let mut stream = tunnel::open(origin, tls, &request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let owner = Connection::owner(&config.postgresql);
    crate::db::databases::restore_streamed(&owner, database, &mut stream)
        .await
        .map_err(|e| format!("the schema of {database}: {e}"))
}

/// Makes the subscriptions' role and the (disabled) subscriptions, then enables them once
/// the role holds no power beyond BlueMind's role.
async fn subscribe(
    config: &AgentConfig,
    state: &Following,
    ticket: &PublishTicket,
    own_version: u32,
) -> Result<(), String> {
    let pg = &config.postgresql;
    let admin = Connection::admin(pg);
    let logical = state.logical.as_ref().ok_or("not a logical follow")?;
    let role = ident(&logical.role);
    let before_16 = crate::db::wal::major(own_version) < 16;
    let mut sql = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN CREATE ROLE {role}; END IF; END $$;\n\
         ALTER ROLE {role} WITH LOGIN PASSWORD NULL NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS {power};\n\
         GRANT {owner} TO {role};\n",
        name = literal(&logical.role),
        owner = ident(&pg.user),
        power = if before_16 { "SUPERUSER" } else { "NOSUPERUSER" },
    );
    if !before_16 {
        sql.push_str(&format!("GRANT pg_create_subscription TO {role};\n"));
    }
    for (database, _) in &logical.subscriptions {
        sql.push_str(&format!(
            "GRANT CREATE ON DATABASE {} TO {role};\n",
            ident(database)
        ));
    }
    admin
        .psql("postgres", &sql)
        .await
        .map_err(|e| format!("preparing the subscriptions' role: {e}"))?;
    let created = async {
        for (database, subscription) in &logical.subscriptions {
            let published = ticket
                .databases
                .iter()
                .find(|d| &d.name == database)
                .ok_or_else(|| format!("the origin did not publish {database}"))?;
            let conninfo = format!(
                "host={} port={} dbname={} user={} password={} application_name=bmfleet sslmode=disable",
                conninfo_value(&pg.relay_dir.display().to_string()),
                standby::RELAY_PORT,
                conninfo_value(database),
                conninfo_value(&ticket.role),
                conninfo_value(&ticket.password),
            );
            admin
                .psql(
                    database,
                    &format!(
                        "SET search_path = pg_catalog;\nSET ROLE {role};\n\
                         CREATE SUBSCRIPTION {sub} CONNECTION {conninfo} PUBLICATION {publication} \
                         WITH (create_slot = false, slot_name = {slot}, enabled = false, copy_data = true);\n",
                        sub = ident(subscription),
                        conninfo = literal(&conninfo),
                        publication = ident(&published.publication),
                        slot = literal(&published.slot),
                    ),
                )
                .await
                .map_err(|e| format!("subscribing {database}: {e}"))?;
        }
        Ok::<(), String>(())
    }
    .await;
    if before_16 {
        admin
            .psql("postgres", &format!("ALTER ROLE {role} NOSUPERUSER;\n"))
            .await
            .map_err(|e| format!("taking the subscriptions' role's superuser back: {e}"))?;
    }
    created?;
    for (database, subscription) in &logical.subscriptions {
        as_subscriber(
            &admin,
            database,
            &logical.role,
            &format!("ALTER SUBSCRIPTION {} ENABLE;\n", ident(subscription)),
        )
        .await?;
    }
    Ok(())
}

/// A libpq connection-string value, quoted.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Runs `sql` in `database` as the subscriptions' role, `search_path` pinned.
async fn as_subscriber(
    admin: &Connection,
    database: &str,
    role: &str,
    sql: &str,
) -> Result<String, String> {
    admin
        .psql(
            database,
            &format!(
                "SET search_path = pg_catalog;\nSET ROLE {};\n{sql}",
                ident(role)
            ),
        )
        .await
        .map_err(|e| format!("{database}: {e}"))
}

/// How long the subscriptions may go without a running worker, or keep meeting errors
/// without getting anywhere, before following (or catching up) fails.
const WORKER_GRACE: Duration = Duration::from_secs(30);

/// Watches the subscriptions across polls: a transient error (the origin's agent restarting,
/// a relay reconnecting) is retried by PostgreSQL and passes; errors that keep coming while
/// nothing advances, or workers that stay stopped, fail.
#[derive(Debug, Default)]
struct Watch {
    stopped_since: Option<Instant>,
    failing_since: Option<Instant>,
    errors: u64,
    last: (u64, u64),
}

impl Watch {
    fn check(&mut self, p: &Progress) -> Result<(), String> {
        let now = Instant::now();
        let position = (p.not_ready, p.lowest.unwrap_or(0));
        let advanced = position != self.last;
        self.last = position;
        if p.errors > self.errors {
            self.errors = p.errors;
            self.failing_since.get_or_insert(now);
        } else if advanced {
            self.failing_since = None;
        }
        if self
            .failing_since
            .is_some_and(|since| since.elapsed() > WORKER_GRACE)
        {
            return Err(format!(
                "the subscriptions keep meeting errors copying or applying the origin's rows ({} \
                 so far, nothing advanced for {} s; this host's PostgreSQL log says which)",
                p.errors,
                WORKER_GRACE.as_secs()
            ));
        }
        if p.stopped == 0 {
            self.stopped_since = None;
            return Ok(());
        }
        let since = *self.stopped_since.get_or_insert(now);
        if since.elapsed() > WORKER_GRACE {
            return Err(format!(
                "{} subscription(s) have had no running worker for {} s (this host's PostgreSQL \
                 log says why: max_logical_replication_workers, the relay, the origin)",
                p.stopped,
                WORKER_GRACE.as_secs()
            ));
        }
        Ok(())
    }
}

/// Waits until every table has had its initial copy.
async fn wait_ready(
    config: &AgentConfig,
    state: &Following,
    own_version: u32,
) -> Result<(), String> {
    let logical = state.logical.as_ref().ok_or("not a logical follow")?;
    let owner = Connection::owner(&config.postgresql);
    let mut watch = Watch::default();
    loop {
        let progress = progress(&owner, logical, own_version).await?;
        watch.check(&progress)?;
        if progress.not_ready == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Catches the subscriptions up with the stopped origin, detaches them, sets the origin's
/// sequence values and compares the databases (`origin`: the databases grant of the step):
/// what changed on each side since the verified point when there is one
/// ([`crate::db::gate::block_point`]), else every table. Returns the comparison and what it covered.
/// Called by [`standby::promote`] when what this host follows is a subscription.
pub async fn promote(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
    state: Following,
    known: Option<&bmfleet_proto::v1::WalPosition>,
) -> Result<(Vec<DatabaseMove>, String), String> {
    let started = Instant::now();
    let logical = state.logical.clone().ok_or("not a logical follow")?;
    let owner = Connection::owner(&config.postgresql);
    if state.promoted {
        // A repeated request (the agent restarted after the promotion): compare only.
        let (theirs, ours) = tokio::join!(
            crate::db::compare::origin_manifest(config, tls, origin, true),
            crate::db::compare::own_manifests(config, &owner)
        );
        // As after the first promotion: a slot that stays is the instance's end's to drop,
        // never a reason to fail a move that is done.
        if let Err(e) = crate::db::gate::block_point::release_own_wal(config, &state.grant_id).await
        {
            tracing::warn!(error = %e, "the gate slot stays until the instance ends");
        }
        return Ok((
            crate::db::compare::compare_all(&theirs?, &ours?, 0),
            "every table compared (a repeated request)".into(),
        ));
    }
    // The origin is stopped: its half of the gate starts now, beside the catch-up.
    let half = match &state.verified {
        Some(point) => {
            let (config, tls, origin, since) = (
                config.clone(),
                tls.clone(),
                origin.clone(),
                point.lsn.clone(),
            );
            Half::Totals(tokio::spawn(async move {
                let (totals, names) = tokio::join!(
                    crate::db::gate::block_point::ask_totals(&config, tls.clone(), &origin, &since),
                    crate::db::compare::origin_manifest(&config, tls, &origin, false)
                );
                Ok((totals, names?))
            }))
        }
        None => Half::Full(crate::db::compare::origin_checksums(
            config,
            tls.clone(),
            origin,
        )),
    };
    let own_version = owner
        .server_version_num()
        .await
        .map_err(|e| e.to_string())?;
    let (_, wanted) = crate::db::wal::stop_position(config, tls.clone(), origin, known).await?;
    let mut watch = Watch::default();
    // Subscriptions already gone: an earlier request caught up and detached them, then
    // stopped (the agent restarted); the comparison below is the proof either way.
    let mut waiting = subscribed(config, &logical).await?;
    while waiting {
        let progress = progress(&owner, &logical, own_version).await?;
        watch.check(&progress)?;
        waiting = progress.not_ready > 0 || progress.lowest.is_none_or(|l| l < wanted);
        if waiting {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let caught_up_ms = started.elapsed().as_millis() as u64;
    tracing::info!(origin = %origin.name, caught_up_ms, "the subscriptions caught up");
    // The data is final: detaching and this host's half of the gate run side by side.
    let (theirs, compared, gate) = match half {
        Half::Full(theirs) => {
            let (detached, ours) = tokio::join!(
                unsubscribe(config, &state),
                crate::db::compare::own_manifests(config, &owner)
            );
            detached?;
            let ours = ours?;
            let theirs = theirs
                .await
                .map_err(|e| format!("the origin's checksums stopped: {e}"))??;
            let compared = crate::db::compare::compare_all(&theirs, &ours, caught_up_ms);
            (
                theirs,
                compared,
                "every table compared: no verified point".to_string(),
            )
        }
        Half::Totals(asked) => {
            let (detached, ours, asked) = tokio::join!(
                unsubscribe(config, &state),
                crate::db::gate::block_point::own_totals(config, &owner),
                asked
            );
            detached?;
            let gate = asked
                .map_err(|e| format!("asking the origin's totals stopped: {e}"))
                .and_then(|a| a)
                .and_then(|(totals, names)| {
                    let theirs = totals?;
                    let (ours, here) = ours?;
                    let covered = format!(
                        "changes since the verified point: on the origin {}; here {here}; caught up in {caught_up_ms} ms",
                        theirs.covered
                    );
                    Ok((names, theirs.databases, ours, covered))
                });
            match gate {
                Ok((names, theirs, ours, covered)) => {
                    tracing::info!(origin = %origin.name, %covered, "the databases' gate");
                    let compared =
                        crate::db::compare::compare_manifests(&theirs, &ours, caught_up_ms);
                    (names, compared, covered)
                }
                Err(why) => {
                    tracing::warn!(origin = %origin.name, %why, "the gate on the changes since the verified point failed: every table is compared");
                    let (theirs, ours) = tokio::join!(
                        crate::db::compare::origin_manifest(config, tls, origin, true),
                        crate::db::compare::own_manifests(config, &owner)
                    );
                    let theirs = theirs?;
                    let compared = crate::db::compare::compare_all(&theirs, &ours?, caught_up_ms);
                    let gate = format!("every table compared: the changes since the verified point could not be ({why})");
                    (theirs, compared, gate)
                }
            }
        }
    };
    relay.stop();
    set_sequences(&owner, &theirs).await?;
    crate::db::databases::set_owner_password(config, &theirs.password).await?;
    finish(config, &logical).await?;
    crate::db::follow::set_following(
        config,
        Some(&Following {
            promoted: true,
            ..state.clone()
        }),
    )?;
    // The point is used: this host keeps no WAL for it any more (the instance's end tries
    // again if this fails).
    if let Err(e) = crate::db::gate::block_point::release_own_wal(config, &state.grant_id).await {
        tracing::warn!(error = %e, "the gate slot stays until the instance ends");
    }
    Ok((compared, gate))
}

/// The origin's totals (or why not) and its sequences' values.
type OriginTotals = tokio::task::JoinHandle<
    Result<
        (
            Result<crate::db::gate::block_point::PointTotals, String>,
            ManifestReply,
        ),
        String,
    >,
>;

/// The origin's half of the downtime's gate, under way during the catch-up.
enum Half {
    /// Its totals since the verified point, and its sequences' values.
    Totals(OriginTotals),
    /// Every table's checksum (and the sequences' values).
    Full(tokio::task::JoinHandle<Result<ManifestReply, String>>),
}

/// Sets every sequence the origin has (by name, found in this host's own catalog) to the
/// origin's value. The origin's names and values are data: names are matched against this
/// host's catalog, values are numbers.
async fn set_sequences(
    owner: &Connection,
    theirs: &crate::db::compare::ManifestReply,
) -> Result<(), String> {
    for db in &theirs.databases {
        let rows: Vec<String> = db
            .sequences
            .iter()
            .filter_map(|s| {
                let (schema, name) = s.name.split_once('.')?;
                Some(format!(
                    "({}, {}, {}::bigint, {})",
                    literal(schema),
                    literal(name),
                    s.last_value?,
                    true
                ))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let sql = format!(
            "SELECT pg_catalog.setval(c.oid, v.value, v.called) FROM (VALUES {}) AS v(nsp, rel, value, called)\n\
             JOIN pg_catalog.pg_namespace n ON n.nspname = v.nsp\n\
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = v.rel AND c.relkind = 'S';\n",
            rows.join(", ")
        );
        owner
            .psql(&db.name, &sql)
            .await
            .map_err(|e| format!("setting the sequences of {}: {e}", db.name))?;
    }
    Ok(())
}

/// Whether any of the follow's subscriptions exists.
async fn subscribed(config: &AgentConfig, logical: &LogicalFollow) -> Result<bool, String> {
    let names: Vec<String> = logical
        .subscriptions
        .iter()
        .map(|(_, s)| literal(s))
        .collect();
    if names.is_empty() {
        return Ok(false);
    }
    let out = Connection::admin(&config.postgresql)
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_catalog.pg_subscription WHERE subname IN ({});\n",
                names.join(", ")
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(out.trim() != "0")
}

/// Disables the subscriptions, detaches them from their slots (the origin drops those with
/// the grant) and drops them.
async fn unsubscribe(config: &AgentConfig, state: &Following) -> Result<(), String> {
    let Some(logical) = &state.logical else {
        return Ok(());
    };
    let admin = Connection::admin(&config.postgresql);
    for (database, subscription) in &logical.subscriptions {
        let exists = admin
            .psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d ON d.oid = s.subdbid WHERE s.subname = {} AND d.datname = {};\n",
                    literal(subscription),
                    literal(database)
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
        if exists.trim() == "0" {
            continue;
        }
        let sub = ident(subscription);
        as_subscriber(
            &admin,
            database,
            &logical.role,
            &format!(
                "ALTER SUBSCRIPTION {sub} DISABLE;\nALTER SUBSCRIPTION {sub} SET (slot_name = NONE);\nDROP SUBSCRIPTION {sub};\n"
            ),
        )
        .await?;
    }
    Ok(())
}

/// After the subscriptions: the role dropped, the owner's attributes back.
async fn drop_role(config: &AgentConfig, logical: &LogicalFollow) -> Result<(), String> {
    let pg = &config.postgresql;
    let admin = Connection::admin(pg);
    let role = ident(&logical.role);
    let mut sql = format!(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {}) THEN\n",
        literal(&logical.role)
    );
    for (database, _) in &logical.subscriptions {
        sql.push_str(&format!(
            "  IF EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = {}) THEN EXECUTE {}; END IF;\n",
            literal(database),
            literal(&format!("REVOKE CREATE ON DATABASE {} FROM {role}", ident(database)))
        ));
    }
    sql.push_str(&format!(
        "  EXECUTE {};\nEND IF; END $$;\n",
        literal(&format!("DROP ROLE {role}"))
    ));
    if let Some(attributes) = &logical.owner_attributes {
        sql.push_str(&format!(
            "ALTER ROLE {} WITH {attributes};\n",
            ident(&pg.user)
        ));
    }
    admin
        .psql("postgres", &sql)
        .await
        .map(|_| ())
        .map_err(|e| format!("removing the subscriptions' role: {e}"))
}

/// After a promotion: the role goes, the set-aside databases are dropped.
async fn finish(config: &AgentConfig, logical: &LogicalFollow) -> Result<(), String> {
    drop_role(config, logical).await?;
    let admin = Connection::admin(&config.postgresql);
    for (database, _) in &logical.subscriptions {
        admin
            .psql(
                "postgres",
                &format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE);\n",
                    ident(&aside_name(database))
                ),
            )
            .await
            .map_err(|e| format!("dropping {database}'s set-aside copy: {e}"))?;
    }
    Ok(())
}

/// The instance ended without a promotion (or the follow failed): the subscriptions and
/// their role go, and this host's own databases come back.
pub async fn end(config: &AgentConfig, relay: &Relay, state: &Following) -> Result<(), String> {
    let Some(logical) = &state.logical else {
        return Ok(());
    };
    unsubscribe(config, state).await?;
    relay.stop();
    drop_role(config, logical).await?;
    crate::db::gate::block_point::release_own_wal(config, &state.grant_id).await?;
    let admin = Connection::admin(&config.postgresql);
    for (database, _) in &logical.subscriptions {
        let aside = literal(&aside_name(database));
        let present = admin
            .psql(
                "postgres",
                &format!("SELECT count(*) FROM pg_catalog.pg_database WHERE datname = {aside};\n"),
            )
            .await
            .map_err(|e| e.to_string())?;
        // Without the set-aside copy, the database here may be the only one: it stays.
        if present.trim() != "1" {
            continue;
        }
        admin
            .psql(
                "postgres",
                &format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE);\n",
                    ident(database)
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
        admin
            .psql(
                "postgres",
                &format!(
                    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE datname = {aside};\n\
                     ALTER DATABASE {} RENAME TO {};\n",
                    ident(&aside_name(database)),
                    ident(database)
                ),
            )
            .await
            .map_err(|e| format!("putting {database} back: {e}"))?;
    }
    crate::db::follow::set_following(config, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_values_are_quoted_for_libpq() {
        assert_eq!(conninfo_value("bj-data"), "'bj-data'");
        assert_eq!(conninfo_value("a b'c\\"), "'a b\\'c\\\\'");
    }

    #[test]
    fn names_fit_postgres_identifiers() {
        let (role, sub) = names(&"z".repeat(80), 1);
        assert!(role.len() <= 63 && sub.len() <= 63);
        assert!(sub.starts_with(&role) && sub.ends_with("_1"));
    }
}
