//! `bmfleet-bench downtime`: two identical lab instances (same spool, same databases, same
//! configuration, no mail arriving), each hot-synced to its target, then the same day of mail
//! (`--churn` of the messages new, deleted or re-flagged) on both origins, then:
//! (a) BlueMind's manual procedure on pair 1 ([`crate::manual`]);
//! (b), (c), (d) bmfleet on pairs 2, 3, 4: the orchestrator's own engine, run in this process
//!     against the real agents, with the churn applied right after its pre-window pass, so
//!     that its cold sync faces the same changes as the manual one; by default the target's
//!     databases follow as a standby, then are dumped and restored, then follow by logical
//!     replication (its origin runs with `wal_level = logical`); `--paths` picks fewer (a
//!     pair is built only for each path measured).
//!
//! Also measured on the same machine: the link's raw TCP throughput between two lab hosts,
//! the manual `psql` restore time (together the physical floor), and the hot sync of the
//! whole tree through the agents' tunnel vs the manual rsync over ssh.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bmfleet_orchestrator::agent_steps::GrpcAgents;
use bmfleet_orchestrator::agents::AgentPool;
use bmfleet_orchestrator::clock::{Clock, SystemClock};
use bmfleet_orchestrator::conductor::Conductor;
use bmfleet_orchestrator::engine::{AgentPort, Job, StepResult};
use bmfleet_orchestrator::machine::{PassStats, Phase, Step};
use bmfleet_orchestrator::metrics::Metrics;
use bmfleet_orchestrator::state::State;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::LocalIdentity;
use bmfleet_proto::BLUEMIND_DATA_DIRS;
use bmfleet_tests::lab_fleet::{
    churn, churn_databases, service_ip, Churn, DbChurn, LabFleet, LabParams, MessageSizes,
};

use crate::manual::{ColdRun, Manual, Timed, IP_STEP, START_STEP, STOP_STEP};

/// What to build.
pub struct Params {
    /// Messages per spool.
    pub files: usize,
    /// How big they are.
    pub message_sizes: MessageSizes,
    /// Rows of the biggest table of each database.
    pub db_rows: u64,
    /// Fraction of messages (and of database rows) changed after the hot sync.
    pub churn: f64,
    /// Drop the page cache right before each cold sync (as on a server whose data is not all
    /// in memory).
    pub cold_cache: bool,
    /// bmfleet's database paths to measure, each on its own pair after the manual one.
    pub paths: Vec<DbPath>,
    /// The logical path's target runs PostgreSQL 16 (a move across majors).
    pub subscriber_pg16: bool,
    /// Where the day's database changes land.
    pub db_churn: DbChurn,
    /// When the day's changes land on bmfleet's origins.
    pub day_lands: DayLands,
}

/// How bmfleet moves the databases in one measured run (the fleet file's `db_sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DbPath {
    /// The target's cluster follows as a physical standby.
    Stream,
    /// The databases are dumped and restored in the downtime.
    Dump,
    /// The target's databases follow by logical replication (the origin runs with
    /// `wal_level = logical`).
    Logical,
}

impl DbPath {
    /// The fleet file's `db_sync` value.
    fn db_sync(self) -> &'static str {
        match self {
            DbPath::Stream => "stream",
            DbPath::Dump => "dump",
            DbPath::Logical => "logical",
        }
    }

    /// The report's row label.
    fn label(self) -> &'static str {
        match self {
            DbPath::Stream => "databases following (standby)",
            DbPath::Dump => "databases dumped and restored",
            DbPath::Logical => "databases following (logical replication)",
        }
    }

    /// What the progress line says.
    fn describe(self) -> &'static str {
        match self {
            DbPath::Stream => "the target's databases following the origin's (db_sync = stream)",
            DbPath::Dump => "the databases dumped and restored (db_sync = dump)",
            DbPath::Logical => "the databases following by logical replication (db_sync = logical)",
        }
    }
}

/// The report's letter for the `i`-th measured path: (b), (c), (d).
fn letter(i: usize) -> char {
    char::from(b'b' + u8::try_from(i).unwrap_or(0))
}

/// Writes dirty pages and drops the page cache (root only).
fn drop_page_cache() -> anyhow::Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// The size of one instance's data.
struct Size {
    entries: u64,
    regular_files: u64,
    hard_linked: u64,
    bytes: u64,
    database_bytes: u64,
}

fn measure(fleet: &LabFleet, host: &str) -> Size {
    let mut size = Size {
        entries: 0,
        regular_files: 0,
        hard_linked: 0,
        bytes: 0,
        database_bytes: 0,
    };
    let mut inodes = HashSet::new();
    for dir in BLUEMIND_DATA_DIRS {
        let root = fleet.root(host).join(dir.trim_start_matches('/'));
        for entry in walkdir::WalkDir::new(root).into_iter().flatten() {
            size.entries += 1;
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                size.regular_files += 1;
                if meta.nlink() > 1 {
                    size.hard_linked += 1;
                }
                if inodes.insert(meta.ino()) {
                    size.bytes += meta.len();
                }
            }
        }
    }
    size.database_bytes = fleet
        .sql(
            host,
            "postgres",
            "SELECT pg_database_size('bj') + pg_database_size('bj-data')",
        )
        .trim()
        .parse()
        .unwrap_or(0);
    size
}

/// Every regular file and symlink of the data dirs, with size and mtime, by relative path.
fn tree(root: &Path) -> BTreeMap<String, (u64, i64)> {
    let mut out = BTreeMap::new();
    for dir in BLUEMIND_DATA_DIRS {
        let base = root.join(dir.trim_start_matches('/'));
        for entry in walkdir::WalkDir::new(&base).into_iter().flatten() {
            if let Ok(meta) = entry.path().symlink_metadata() {
                if !meta.is_dir() {
                    let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
                    out.insert(rel.display().to_string(), (meta.len(), meta.mtime()));
                }
            }
        }
    }
    out
}

/// The target holds what the origin holds: the same files (size, mtime) and the same rows.
fn check_migrated(fleet: &LabFleet, origin: &str, target: &str) -> anyhow::Result<()> {
    let (o, t) = (tree(&fleet.root(origin)), tree(&fleet.root(target)));
    if o != t {
        let differ = o.iter().filter(|(k, v)| t.get(*k) != Some(v)).count()
            + t.keys().filter(|k| !o.contains_key(*k)).count();
        bail!("{target} differs from {origin} in {differ} files");
    }
    let count =
        "SELECT (SELECT count(*) FROM t_calendar_event) || ' ' || (SELECT count(*) FROM t_mailbox) \
         || ' ' || (SELECT count(*) || ':' || sum(hashtext(verb)) FROM t_container_acl)";
    let (oc, tc) = (
        fleet.sql(origin, "bj", count),
        fleet.sql(target, "bj", count),
    );
    if oc != tc {
        bail!("bj differs: {origin} has {oc:?} rows, {target} {tc:?}");
    }
    let body = "SELECT count(*) FROM t_message_body";
    let (ob, tb) = (
        fleet.sql(origin, "bj-data", body),
        fleet.sql(target, "bj-data", body),
    );
    if ob != tb {
        bail!("bj-data differs: {origin} has {ob:?} rows, {target} {tb:?}");
    }
    Ok(())
}

/// Raw TCP throughput from `from` to `to` over the lab's link, bytes per second.
fn link_throughput(fleet: &LabFleet, from: &str, to: &str) -> anyhow::Result<f64> {
    const BYTES: usize = 2 << 30;
    let address = format!("{}:9999", fleet.lab.host(from).ip);
    let listener = fleet
        .lab
        .run_in(from, || std::net::TcpListener::bind(&address))?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> std::io::Result<()> {
            let (mut stream, _) = listener.accept()?;
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..BYTES / chunk.len() {
                stream.write_all(&chunk)?;
            }
            Ok(())
        });
        let secs = fleet.lab.run_in(to, || -> std::io::Result<f64> {
            let mut stream = std::net::TcpStream::connect(&address)?;
            let started = Instant::now();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < BYTES {
                match stream.read(&mut buf)? {
                    0 => break,
                    n => got += n,
                }
            }
            Ok(started.elapsed().as_secs_f64())
        })?;
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread"))??;
        Ok(BYTES as f64 / secs)
    })
}

/// When the day's changes land on a bmfleet origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DayLands {
    /// All in the last second: right after the pre-window pass, before the stop (the cold
    /// sync faces exactly what the manual procedure's faces: the worst case).
    LastSecond,
    /// While the service still runs: right before the pre-window pass (which carries the
    /// files and takes the databases' verified point), as a day's mail arrives before its
    /// window; the cold sync then faces only what changes after.
    Live,
    /// While the pre-window pass runs: the day starts landing with its first round (as mail
    /// keeps arriving until the stop); its later rounds carry what landed meanwhile.
    During,
}

/// The real agents, with the day's mail landing on the origin around the pre-window pass
/// ([`DayLands`]); the engine then stops the origin.
struct ChurnAroundPreWindowPass {
    agents: GrpcAgents,
    pending: Arc<Mutex<Option<ChurnJob>>>,
    churned: Arc<Mutex<Option<Churn>>>,
    lands: DayLands,
}

/// The day of mail still to come: [`churn`]'s arguments, and the databases'.
struct ChurnJob {
    root: std::path::PathBuf,
    messages: usize,
    sizes: MessageSizes,
    fraction: f64,
    /// The day's database changes on the origin's cluster ([`churn_databases`]).
    databases: Arc<dyn Fn() + Send + Sync>,
    cold_cache: bool,
}

/// The day of mail lands (once: the first call takes the job).
async fn land(pending: Arc<Mutex<Option<ChurnJob>>>, churned: Arc<Mutex<Option<Churn>>>) {
    let job = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(j) = job else { return };
    let day = move || {
        (j.databases)();
        let c = churn(&j.root, j.messages, j.sizes, j.fraction);
        if j.cold_cache {
            if let Err(e) = drop_page_cache() {
                eprintln!("{e:#}");
            }
        }
        c
    };
    if let Ok(c) = tokio::task::spawn_blocking(day).await {
        *churned.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }
}

impl AgentPort for ChurnAroundPreWindowPass {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = StepResult> + Send>> {
        let step = job.step;
        let run = self.agents.run(job);
        let (pending, churned) = (self.pending.clone(), self.churned.clone());
        let before = self.lands == DayLands::Live && step == Step::PreWindowPass;
        let during = self.lands == DayLands::During && step == Step::PreWindowPass;
        Box::pin(async move {
            // Live: the day lands before the pass (whose future is not polled yet).
            if before {
                land(pending.clone(), churned.clone()).await;
            }
            if during {
                let ((), result) = tokio::join!(land(pending, churned), run);
                return result;
            }
            let result = run.await;
            if !before && step == Step::PreWindowPass && result.is_ok() {
                land(pending, churned).await;
            }
            result
        })
    }

    fn end_instance(
        &self,
        migration: String,
        instance: bmfleet_orchestrator::fleet::InstanceSpec,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.agents.end_instance(migration, instance)
    }
}

/// bmfleet's run on one pair.
struct BmfleetRun {
    phase: Phase,
    downtime: f64,
    steps: Vec<Timed>,
    first_pass: PassStats,
    final_pass: Option<PassStats>,
    pre_window: Option<PassStats>,
    /// What the databases' gate compared.
    gate: String,
    churn: Churn,
}

fn fleet_text(instance: &str, pair: usize, db_sync: &str) -> String {
    format!(
        "[fleet]\nname = \"bench\"\nmax_concurrent_downtime = 1\nmin_stagger_secs = 1\ncanary_count = 0\ncanary_approval = false\ndb_sync = \"{db_sync}\"\n\
         [[fleet.windows]]\ndays = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\",\"sat\",\"sun\"]\nstart = \"00:00\"\nend = \"12:00\"\ntimezone = \"UTC\"\n\
         [[fleet.windows]]\ndays = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\",\"sat\",\"sun\"]\nstart = \"12:00\"\nend = \"00:00\"\ntimezone = \"UTC\"\n\
         [[instance]]\nname = \"{instance}\"\norigin = \"origin-{pair}\"\ntarget = \"target-{pair}\"\nservice_ip = \"{}/24\"\nbluemind = \"5.x\"\n",
        service_ip(pair)
    )
}

/// Step timings of one instance from its stored transitions: a step starts with the
/// transition whose actions run it and ends with its `Succeeded` event.
fn step_timings(
    state: &State,
    instance: &str,
    downtime_start_ms: i64,
) -> anyhow::Result<StepTimings> {
    let rows = state.transitions(Some(instance), 0, 100_000)?;
    let (mut started, mut timed) = (BTreeMap::<String, i64>::new(), Vec::new());
    let (mut first_pass, mut final_pass, mut gate) = (None, None, String::new());
    let mut pre_window = None;
    for row in rows {
        let event: serde_json::Value = serde_json::from_str(&row.event)?;
        if let Some(ok) = event.get("Succeeded") {
            let step = ok["step"].as_str().unwrap_or_default().to_string();
            let stats: Option<PassStats> = serde_json::from_value(ok["stats"].clone()).ok();
            match step.as_str() {
                "HotPass" if first_pass.is_none() => first_pass = stats,
                "FinalPass" => final_pass = stats,
                "PreWindowPass" => pre_window = stats,
                "Databases" => gate = ok["gate"].as_str().unwrap_or_default().to_string(),
                _ => {}
            }
            if let Some(start) = started.remove(&step) {
                if row.at_ms >= downtime_start_ms {
                    timed.push(Timed {
                        name: step,
                        start: (start - downtime_start_ms) as f64 / 1000.0,
                        secs: (row.at_ms - start) as f64 / 1000.0,
                    });
                }
            }
        }
        let actions: serde_json::Value = serde_json::from_str(&row.actions)?;
        for action in actions.as_array().into_iter().flatten() {
            if let Some(step) = action["Run"]["step"].as_str() {
                started.insert(step.to_string(), row.at_ms);
            }
        }
    }
    timed.sort_by(|a, b| a.start.total_cmp(&b.start));
    Ok(StepTimings {
        timed,
        first_pass,
        final_pass,
        pre_window,
        gate,
    })
}

/// What an instance's transitions say about its steps.
struct StepTimings {
    /// Each step that ran from the downtime's start on, in start order.
    timed: Vec<Timed>,
    /// The first hot pass's statistics.
    first_pass: Option<PassStats>,
    /// The final pass's statistics.
    final_pass: Option<PassStats>,
    /// The (last) pre-window pass's statistics: its rounds, its verified point.
    pre_window: Option<PassStats>,
    /// What the databases' gate compared.
    gate: String,
}

/// Runs the orchestrator's engine in this process (in the orchestrator's namespace) on pair
/// `pair`, until the instance is finished.
fn bmfleet(
    fleet: &Arc<LabFleet>,
    pair: usize,
    params: &Params,
    db_sync: &str,
) -> anyhow::Result<BmfleetRun> {
    let instance = format!("mail-{pair}");
    let origin_root = fleet.root(&format!("origin-{pair}"));
    let (messages, fraction) = (params.files, params.churn);
    let databases = {
        let (fleet, origin, rows) = (fleet.clone(), format!("origin-{pair}"), params.db_rows);
        let profile = params.db_churn;
        Arc::new(move || churn_databases(fleet.pg(&origin), rows, fraction, profile))
    };
    fleet.lab.run_in("orch", || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let identity = LocalIdentity::load(&fleet.orchestrator, Role::Orchestrator)?;
            let pool = Arc::new(AgentPool::new(
                &identity,
                &fleet.agents,
                Duration::from_secs(30),
            )?);
            let state = Arc::new(State::open(
                &fleet.dir().join(format!("bench/state-{pair}.db")),
            )?);
            let metrics = Arc::new(Metrics::new());
            let clock: Arc<dyn Clock> = Arc::new(SystemClock);
            let churned = Arc::new(Mutex::new(None));
            let port = Arc::new(ChurnAroundPreWindowPass {
                agents: GrpcAgents::new(pool.clone(), clock.clone(), metrics.clone()),
                pending: Arc::new(Mutex::new(Some(ChurnJob {
                    root: origin_root,
                    messages,
                    sizes: params.message_sizes,
                    fraction,
                    databases,
                    cold_cache: params.cold_cache,
                }))),
                churned: churned.clone(),
                lands: params.day_lands,
            });
            let conductor = Conductor::new(state.clone(), clock, port, pool.clone(), metrics);
            conductor.apply(
                &fleet_text(&instance, pair, db_sync),
                "bench-fleet.toml",
                &[],
            )?;
            let deadline = Instant::now() + Duration::from_secs(3600);
            let finished = loop {
                let stored = state.instances()?;
                if let Some((_, i)) = stored.into_iter().find(|(n, _)| *n == instance) {
                    if matches!(
                        i.phase,
                        Phase::Done | Phase::Failed | Phase::RolledBack | Phase::Aborted
                    ) {
                        break i;
                    }
                }
                if Instant::now() > deadline {
                    bail!("bmfleet did not finish {instance} within an hour");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let (start, end) = (
                finished.downtime_start_ms.unwrap_or(0),
                finished.downtime_end_ms.unwrap_or(0),
            );
            let timings = step_timings(&state, &instance, start)?;
            let churn = churned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .context("the engine never ran a pre-window pass")?;
            let downtime = (end - start) as f64 / 1000.0;
            Ok(BmfleetRun {
                phase: finished.phase,
                downtime,
                // The downtime's steps (post-migration and verify come after it).
                steps: timings
                    .timed
                    .into_iter()
                    .filter(|s| s.start + s.secs <= downtime + 0.001)
                    .collect(),
                first_pass: timings.first_pass.context("no hot pass recorded")?,
                final_pass: timings.final_pass,
                pre_window: timings.pre_window,
                gate: timings.gate,
                churn,
            })
        })
    })
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// The steps with their share of the downtime (steps that run side by side each count whole).
fn print_steps(steps: &[Timed], downtime: f64) {
    println!("| step | starts at | takes | share of the downtime |");
    println!("| --- | ---: | ---: | ---: |");
    for s in steps {
        let share = if s.start < 0.0 {
            "before it".to_string()
        } else {
            format!("{:.0} %", 100.0 * s.secs / downtime.max(f64::EPSILON))
        };
        println!(
            "| {} | {:.2} s | {:.2} s | {share} |",
            s.name, s.start, s.secs
        );
    }
}

/// A time the databases' gate reports ("… replayed at 55 ms, …"), in seconds.
fn gate_secs(gate: &str, what: &str) -> Option<f64> {
    let rest = &gate[gate.find(what)? + what.len()..];
    let ms: f64 = rest.trim_start().split(' ').next()?.parse().ok()?;
    Some(ms / 1000.0)
}

/// The physical floor of one bmfleet run: what no procedure can avoid.
struct Floor {
    /// The day's changed bytes at the link's measured throughput.
    transfer: f64,
    /// The databases' share: the standby's replay after the stop (from the gate's account:
    /// from the origin's last position known to replayed), or the manual `psql` restore for
    /// the dump path.
    databases: f64,
    /// What it is ("the standby's catch-up", "psql restore").
    databases_what: &'static str,
    /// Stopping the services, moving the IP (without `arping`'s wait: one frame is sent), and
    /// starting the services, as the manual procedure measured them.
    stop_ip_start: f64,
}

impl Floor {
    fn total(&self) -> f64 {
        self.transfer + self.databases + self.stop_ip_start
    }
}

fn floor_of(path: DbPath, run: &BmfleetRun, cold: &ColdRun, transfer: f64) -> Floor {
    let manual_step = |name: &str| {
        cold.steps
            .iter()
            .find(|s| s.name == name)
            .map_or(0.0, |s| s.secs)
    };
    let stop_ip_start = [STOP_STEP, IP_STEP, START_STEP]
        .iter()
        .map(|s| manual_step(s))
        .sum();
    let (databases, databases_what) = match path {
        DbPath::Dump => (cold.restore_secs, "psql restore"),
        DbPath::Stream | DbPath::Logical => (
            gate_secs(&run.gate, "replayed at")
                .zip(gate_secs(&run.gate, "last position known at"))
                .map_or(0.0, |(replayed, known)| (replayed - known).max(0.0)),
            "the standby's catch-up",
        ),
    };
    Floor {
        transfer,
        databases,
        databases_what,
        stop_ip_start,
    }
}

/// Builds the lab, runs both procedures, prints the report (Markdown tables, then one JSON
/// line).
pub fn run(params: Params) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root: the benchmark builds network namespaces");
    }
    if params.paths.is_empty() {
        bail!("--paths names no database path to measure (stream, dump, logical)");
    }
    // Pair 1 for the manual procedure, one more per path.
    let pairs = params.paths.len() + 1;
    println!(
        "== building the lab: {pairs} identical instances, {} messages and {} rows per big table each",
        params.files, params.db_rows
    );
    let built = Instant::now();
    let fleet = Arc::new(LabFleet::build(LabParams {
        enroll: false,
        pairs,
        messages: params.files,
        message_sizes: params.message_sizes,
        db_rows: params.db_rows,
        deliver_ms: 0,
        db_write_ms: 0,
        logical_pair: params
            .paths
            .iter()
            .position(|p| *p == DbPath::Logical)
            .map(|i| i + 2),
        subscriber_pg16: params.subscriber_pg16,
        target_spool_mib: None,
        renamed_target_card: None,
        real_mail: false,
    }));
    // This process runs the engine itself; the lab's orchestrator would only add its health
    // checks' walks of the data dirs to the measurements.
    fleet.lab.kill_matching("orch", "bmfleet-orchestrator");
    std::fs::create_dir_all(fleet.dir().join("bench"))?;
    let size = measure(&fleet, "origin-1");
    println!(
        "   built in {:.0} s: {} entries, {} regular files ({} hard-linked), {:.1} MiB of files, {:.1} MiB of databases",
        built.elapsed().as_secs_f64(),
        size.entries,
        size.regular_files,
        size.hard_linked,
        mib(size.bytes as f64),
        mib(size.database_bytes as f64)
    );
    let link = link_throughput(&fleet, "origin-1", "target-1")?;
    println!(
        "== link: {:.0} MiB/s raw TCP between two lab hosts",
        mib(link)
    );

    // A mail client on the orchestrator's host asks every service IP for an IMAP greeting
    // every 100 ms all through the runs: each pair's longest outage is what its clients saw.
    let stop_probes = std::sync::atomic::AtomicBool::new(false);
    let (measured, seen) = std::thread::scope(|scope| {
        let probes = scope.spawn(|| bmfleet_tests::probe::client_downtimes(&fleet, &stop_probes));
        let measured = (|| -> anyhow::Result<_> {
            println!(
                "== (a) manual procedure on pair 1: hot sync (7 × rsync -avH --delete over ssh)"
            );
            let manual = Manual::prepare(&fleet, "origin-1", "target-1")?;
            let manual_hot = manual.hot_sync()?;
            println!("   {manual_hot:.1} s");
            churn_databases(
                fleet.pg("origin-1"),
                params.db_rows,
                params.churn,
                params.db_churn,
            );
            let churn_a = churn(
                &fleet.root("origin-1"),
                params.files,
                params.message_sizes,
                params.churn,
            );
            println!("   churn: {churn_a:?}");
            if params.cold_cache {
                drop_page_cache()?;
            }
            println!("   cold sync and server replacement");
            let cold: ColdRun = manual.cold_sync_and_cutover(&service_ip(1))?;
            println!("   downtime {:.2} s", cold.downtime);
            check_migrated(&fleet, "origin-1", "target-1").context("the manual procedure")?;
            drop(manual);

            let mut runs = Vec::new();
            for (i, &path) in params.paths.iter().enumerate() {
                let pair = i + 2;
                println!(
                    "== ({}) bmfleet on pair {pair}: the orchestrator's engine against the real agents, {}",
                    letter(i),
                    path.describe()
                );
                let run = bmfleet(&fleet, pair, &params, path.db_sync())?;
                if run.phase != Phase::Done {
                    bail!(
                        "bmfleet ended in {:?} on pair {pair}: see {}",
                        run.phase,
                        fleet.dir().display()
                    );
                }
                if run.churn != churn_a {
                    bail!(
                        "the origins did not get the same churn: {churn_a:?} vs {:?}",
                        run.churn
                    );
                }
                check_migrated(&fleet, &format!("origin-{pair}"), &format!("target-{pair}"))
                    .with_context(|| format!("bmfleet on pair {pair}"))?;
                println!("   downtime {:.2} s", run.downtime);
                runs.push((path, run));
            }
            Ok((cold, churn_a, runs, manual_hot))
        })();
        stop_probes.store(true, std::sync::atomic::Ordering::SeqCst);
        (measured, probes.join().unwrap_or_default())
    });
    let (cold, churn_a, runs, manual_hot) = measured?;
    let client = |pair: usize| {
        seen.get(pair - 1)
            .and_then(|v| v.downtime)
            .map_or("none".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    let transfer = churn_a.bytes_written as f64 / link;
    let floors: Vec<Floor> = runs
        .iter()
        .map(|(path, run)| floor_of(*path, run, &cold, transfer))
        .collect();
    println!(
        "\n## Downtime, {} messages ({:?} sizes, {:.0} MiB of files), {:.0} MiB of databases, {:.1}% churn ({:?} in the tables, landing {:?} for bmfleet), page cache {}{}\n",
        params.files,
        params.message_sizes,
        mib(size.bytes as f64),
        mib(size.database_bytes as f64),
        params.churn * 100.0,
        params.db_churn,
        params.day_lands,
        if params.cold_cache {
            "dropped before the cold sync"
        } else {
            "warm"
        },
        if params.subscriber_pg16 {
            ", the logical path's target on PostgreSQL 16"
        } else {
            ""
        }
    );
    println!("| | downtime | a mail client saw |");
    println!("| --- | ---: | ---: |");
    println!(
        "| (a) manual procedure | {:.2} s | {} |",
        cold.downtime,
        client(1)
    );
    for (i, (path, run)) in runs.iter().enumerate() {
        let letter = letter(i);
        println!(
            "| ({letter}) bmfleet, {} | {:.2} s | {} |",
            path.label(),
            run.downtime,
            client(i + 2)
        );
        println!(
            "| ratio ({letter})/(a) | {:.3} |",
            run.downtime / cold.downtime
        );
    }
    for (i, ((_, run), floor)) in runs.iter().zip(&floors).enumerate() {
        println!(
            "| ({})'s physical floor: {:.2} MiB changed at {:.0} MiB/s ({:.3} s) + {} ({:.3} s) + stop, IP, start ({:.3} s) | {:.2} s |",
            letter(i),
            mib(churn_a.bytes_written as f64),
            mib(link),
            floor.transfer,
            floor.databases_what,
            floor.databases,
            floor.stop_ip_start,
            floor.total()
        );
        println!(
            "| ratio ({})/floor | {:.2} |",
            letter(i),
            run.downtime / floor.total()
        );
    }
    println!("\n### (a) manual, by step\n");
    print_steps(&cold.steps, cold.downtime);
    for (i, (path, run)) in runs.iter().enumerate() {
        println!(
            "\n### ({}) bmfleet, {}, by step (final pass, databases and config run in parallel)\n",
            letter(i),
            path.label()
        );
        print_steps(&run.steps, run.downtime);
        if let Some(p) = &run.pre_window {
            println!(
                "\nThe pre-window pass (live): {} round(s), {} files and {:.2} MiB carried in {:.2} s; the last verified point: {}",
                p.rounds,
                p.files_changed,
                mib(p.bytes_changed as f64),
                p.elapsed_ms as f64 / 1000.0,
                p.verified_point
            );
        }
        println!("\nThe databases' gate: {}", run.gate);
    }
    let manual_files: f64 = cold
        .steps
        .iter()
        .filter(|s| s.name.starts_with("rsync"))
        .map(|s| s.secs)
        .sum();
    let step_secs = |run: &BmfleetRun| {
        run.steps
            .iter()
            .find(|s| s.name == "FinalPass")
            .map_or(0.0, |s| s.secs)
    };
    println!("\n### The files inside the downtime, same data\n");
    println!("| | takes | |");
    println!("| --- | ---: | --- |");
    println!("| (a) manual: the rsyncs of the seven dirs | {manual_files:.2} s | |");
    for (i, (path, run)) in runs.iter().enumerate() {
        let name = format!("({}) bmfleet final pass ({})", letter(i), path.db_sync());
        let detail = run.final_pass.as_ref().map_or(String::new(), |f| {
            format!(
                "{} entries listed, {} changed, {:.2} MiB{}{}",
                f.journal_paths.unwrap_or(f.files_scanned),
                f.files_changed,
                mib(f.bytes_changed as f64),
                if f.journal_paths.is_some() {
                    ", verified path by path"
                } else {
                    ", both trees' manifests compared"
                },
                if f.journal_fallback.is_empty() {
                    String::new()
                } else {
                    format!(", fell back: {}", f.journal_fallback)
                },
            ) + &f.phases.as_ref().map_or(String::new(), |p| {
                format!(
                    "; by phase: connections {} ms, journal list {} ms, transfer {} ms, origin's states {} ms, states here {} ms, the rest {} ms",
                    p.connect_ms,
                    p.list_ms,
                    p.transfer_ms,
                    p.verify_origin_ms,
                    p.verify_here_ms,
                    f.elapsed_ms.saturating_sub(
                        p.list_ms + p.transfer_ms + p.verify_origin_ms + p.verify_here_ms
                    )
                )
            })
        });
        println!("| {name} | {:.2} s | {detail} |", step_secs(run));
    }
    let bmfleet_hot = runs
        .first()
        .map_or(0.0, |(_, run)| run.first_pass.elapsed_ms as f64 / 1000.0);
    println!(
        "\n## Hot sync of the whole tree ({:.1} MiB, {} entries)\n",
        mib(size.bytes as f64),
        size.entries
    );
    println!("| | time | throughput |");
    println!("| --- | ---: | ---: |");
    println!(
        "| rsync over ssh (manual) | {manual_hot:.2} s | {:.1} MiB/s |",
        mib(size.bytes as f64) / manual_hot
    );
    println!(
        "| bmfleet tunnel (first hot pass) | {bmfleet_hot:.2} s | {:.1} MiB/s |",
        mib(size.bytes as f64) / bmfleet_hot
    );
    println!(
        "| ratio tunnel/ssh throughput | {:.2} | |",
        manual_hot / bmfleet_hot
    );
    let steps_json = |steps: &[Timed]| {
        steps
            .iter()
            .map(|s| serde_json::json!({"step": s.name, "start": s.start, "seconds": s.secs}))
            .collect::<Vec<_>>()
    };
    println!(
        "{}",
        serde_json::json!({
            "files": params.files, "db_rows": params.db_rows, "churn_fraction": params.churn,
            "entries": size.entries, "data_bytes": size.bytes,
            "database_bytes": size.database_bytes, "churn": {
                "new": churn_a.new, "deleted": churn_a.deleted, "flagged": churn_a.flagged,
                "bytes": churn_a.bytes_written },
            "link_bytes_per_second": link,
            "manual": {"downtime": cold.downtime, "restore": cold.restore_secs, "hot_sync": manual_hot, "steps": steps_json(&cold.steps),
                "client_seen": seen.first().and_then(|v| v.downtime).map(|d| d.as_secs_f64())},
            "bmfleet": runs.iter().zip(&floors).enumerate().map(|(i, ((path, run), floor))| serde_json::json!({
                "db_sync": path.db_sync(), "downtime": run.downtime, "gate": run.gate,
                "floor": floor.total(), "floor_databases": floor.databases,
                "floor_stop_ip_start": floor.stop_ip_start, "floor_transfer": floor.transfer,
                "pre_window": run.pre_window.as_ref().map(|p| serde_json::json!({
                    "rounds": p.rounds, "files": p.files_changed, "bytes": p.bytes_changed,
                    "seconds": p.elapsed_ms as f64 / 1000.0, "verified_point": p.verified_point})),
                "final_pass": run.final_pass.as_ref().map(|f| serde_json::json!({
                    "paths": f.journal_paths, "files": f.files_changed, "bytes": f.bytes_changed,
                    "phases": f.phases})),
                "client_seen": seen.get(i + 1).and_then(|v| v.downtime).map(|d| d.as_secs_f64()),
                "hot_pass": run.first_pass.elapsed_ms as f64 / 1000.0,
                "steps": steps_json(&run.steps)})).collect::<Vec<_>>(),
            "cold_cache": params.cold_cache,
            "db_churn": format!("{:?}", params.db_churn).to_lowercase(),
            "day_lands": format!("{:?}", params.day_lands),
            "subscriber_pg16": params.subscriber_pg16,
        })
    );
    Ok(())
}
