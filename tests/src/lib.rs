//! Test harness for bmfleet's end-to-end tests: a throwaway fleet PKI, agents and
//! orchestrators served in-process on loopback, and the real binaries as child processes.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use bmfleet_agent::config::{
    AgentConfig, ConfigSetConfig, DataPlaneConfig, FactsConfig, MailQueueConfig, NetworkConfig,
    PostgresConfig, ServiceCommands, ServicesConfig,
};
use bmfleet_proto::identity::Role;
use bmfleet_proto::pki::{FleetCa, IssueRequest};
use bmfleet_proto::tls::{client_config, connect, load_roots, LocalIdentity, TlsFiles};
use bmfleet_proto::v1::agent_client::AgentClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A fleet CA in a temporary directory, issuing identities as files.
pub struct TestPki {
    /// The directory holding every file.
    pub dir: tempfile::TempDir,
    ca: FleetCa,
}

impl TestPki {
    /// A fresh fleet CA.
    pub fn new() -> Self {
        bmfleet_proto::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = FleetCa::generate(&format!("test fleet CA {}", unique_ca_suffix())).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write CA");
        TestPki { dir, ca }
    }

    /// Issues `name` with `role`, valid now.
    pub fn issue(&self, name: &str, role: Role) -> TlsFiles {
        self.issue_with(IssueRequest::new(name, role, 30))
    }

    /// Issues a certificate that expired yesterday.
    pub fn issue_expired(&self, name: &str, role: Role) -> TlsFiles {
        let mut req = IssueRequest::new(name, role, 30);
        req.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
        req.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        self.issue_with(req)
    }

    /// Issues any request into files named after the holder and a unique number.
    pub fn issue_with(&self, req: IssueRequest) -> TlsFiles {
        let issued = self.ca.issue(&req).expect("issue");
        let stem = format!("{}-{}", req.name, unique());
        let cert = self.dir.path().join(format!("{stem}.pem"));
        let key = self.dir.path().join(format!("{stem}-key.pem"));
        std::fs::write(&cert, issued.cert_pem).expect("write cert");
        std::fs::write(&key, issued.key_pem).expect("write key");
        TlsFiles {
            ca: self.ca_path(),
            cert,
            key,
            crl: None,
        }
    }

    /// The CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn unique_ca_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A server on loopback, on a runtime of its own (as the real one is a process of its own: a
/// test that blocks its thread, waiting on psql say, does not stop it), stopped when dropped.
pub struct Served {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_on_loopback<F, Fut, E>(run: F) -> Served
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let (stop, stopped) = oneshot::channel();
    let (kill, killed) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the server");
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).expect("listener");
            tokio::select! {
                outcome = run(listener, stopped) => {
                    if let Err(e) = outcome {
                        panic!("server failed: {e}");
                    }
                }
                _ = killed => {}
            }
        });
        // What the server spawned ends with its runtime.
        runtime.shutdown_background();
    });
    Served {
        addr,
        stop: Some(stop),
        kill: Some(kill),
        thread: Some(thread),
    }
}

/// An agent configuration for tests: `data_root` and state under `dir`, services as given.
pub fn agent_config(tls: TlsFiles, dir: &Path, services: Vec<ServiceCommands>) -> AgentConfig {
    AgentConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_listen: None,
        metrics_listen: None,
        data_root: dir.join("root"),
        state_dir: dir.join("state"),
        tls,
        facts: FactsConfig {
            bluemind_version_command: argv(&["echo", "5.1.2"]),
            postgresql_version_command: argv(&["echo", "15.18"]),
            ..FactsConfig::default()
        },
        services: ServicesConfig {
            service: services,
            command_timeout_secs: 30,
        },
        data_plane: DataPlaneConfig {
            tunnel_program: Some(binary("bmfleet-agent")),
            ..DataPlaneConfig::default()
        },
        postgresql: PostgresConfig::default(),
        config_set: ConfigSetConfig::default(),
        // A temp dir has no network configuration of its own: the stanza goes to ifupdown's
        // place (the systems' own choice is tested in the agent and the lab).
        network: NetworkConfig {
            persist: "ifupdown".into(),
            ..NetworkConfig::default()
        },
        // No Postfix runs for a temp dir: no drain, no flush, no structure check (the tests
        // that carry a queue set their own).
        mail_queue: MailQueueConfig {
            postqueue_command: Vec::new(),
            postsuper_command: Vec::new(),
            ..MailQueueConfig::default()
        },
        bluemind_api: Default::default(),
        orchestrators: vec!["orchestrator".into()],
        orchestrator_addresses: Vec::new(),
    }
}

/// Serves an agent in-process on a loopback port.
pub async fn serve_agent(config: AgentConfig) -> Served {
    serve_on_loopback(|listener, stopped| {
        bmfleet_agent::server::serve(config, listener, async {
            let _ = stopped.await;
        })
    })
    .await
}

/// Serves an orchestrator in-process on a loopback port, with the system clock.
pub async fn serve_orchestrator(
    config: bmfleet_orchestrator::config::OrchestratorConfig,
) -> Served {
    serve_orchestrator_with(config, bmfleet_orchestrator::StepRunner::Agents).await
}

/// [`serve_orchestrator`] with the steps run by `steps` (simulated agents, for instance).
pub async fn serve_orchestrator_with(
    config: bmfleet_orchestrator::config::OrchestratorConfig,
    steps: bmfleet_orchestrator::StepRunner,
) -> Served {
    serve_on_loopback(|listener, stopped| {
        bmfleet_orchestrator::run_with(
            config,
            listener,
            Arc::new(bmfleet_orchestrator::clock::SystemClock),
            steps,
            async {
                let _ = stopped.await;
            },
        )
    })
    .await
}

/// An Agent API client presenting `identity` (or no certificate) and expecting the server to
/// be agent `expected_name`.
pub fn agent_client(
    ca: &Path,
    identity: Option<&TlsFiles>,
    identity_role: Role,
    addr: SocketAddr,
    expected_name: &str,
) -> AgentClient<Channel> {
    let roots = load_roots(ca).expect("roots");
    let local = identity.map(|files| LocalIdentity::load(files, identity_role).expect("identity"));
    let config = client_config(roots, local.as_ref(), Role::Agent).expect("client config");
    let channel = connect(
        &addr.to_string(),
        expected_name,
        config,
        Duration::from_secs(5),
    )
    .expect("channel");
    AgentClient::new(channel)
}

/// Words to an argv.
pub fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// A stand-in service: its stop/start/status commands append "NAME ACTION" to `log`, and its
/// stop fails with `fail_stop` as exit code and a message on stderr when set.
pub fn stand_in_service(name: &str, log: &Path, fail_stop: Option<i32>) -> ServiceCommands {
    let cmd = |action: &str, exit: i32| {
        argv(&[
            "sh",
            "-c",
            &format!(
                "echo '{name} {action}' >> '{}'; [ {exit} -eq 0 ] || echo '{name} cannot {action}' >&2; exit {exit}",
                log.display()
            ),
        ])
    };
    ServiceCommands {
        name: name.to_string(),
        start: cmd("start", 0),
        stop: cmd("stop", fail_stop.unwrap_or(0)),
        status: cmd("status", 0),
    }
}

/// The path of a workspace binary built by `cargo build` (the test command builds them first),
/// of the running program's profile: release binaries for a release benchmark, debug ones for
/// the tests.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let release = std::env::current_exe()
        .is_ok_and(|exe| exe.parent().is_some_and(|dir| dir.ends_with("release")));
    let (profile, build) = if release {
        ("release", "cargo build --release --workspace --bins")
    } else {
        ("debug", "cargo build --workspace --bins")
    };
    let path = target.join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `{build}` first (the README's test command does)",
        path.display()
    );
    path
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Starts `command`.
    pub fn spawn(command: &mut Command) -> Self {
        ChildGuard(command.spawn().expect("spawn"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a tool the project's setup installs (setfattr, getfacl…) and returns its stdout;
/// panics, saying what failed, when it cannot run or fails.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (deploy/setup.sh installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub mod bluemind_api;
pub mod browser;
pub mod chaos;
pub mod fuzz;
pub mod lab;
pub mod lab_fleet;
pub mod mail;
pub mod mail_traffic;
pub mod probe;
pub mod prometheus;
pub mod receiver;
pub mod ssh;
pub mod world;

/// A free loopback port for a server a test starts later by address.
///
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768 and up by
/// default), so that neither an outgoing connection nor another `bind(…:0)` can take it between
/// this pick and the server's bind (a port bound then released inside that range can be: CI once
/// failed on "Address already in use"). Each pick in this process is a new port, and one another
/// process holds is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries of one run start at different offsets, so two of them rarely probe alike.
    let start = (std::process::id() * 211) % SPAN;
    for _ in 0..SPAN {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % SPAN;
        let port = u16::try_from(port).expect("port below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// Appends `text` to the file at `path` (made when missing); a ledger line lost to an I/O
/// error shows in the checks that read it.
pub fn append(path: &Path, text: &str) {
    use std::io::Write;
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = log.write_all(text.as_bytes());
    }
}

/// A directory the postgres user can traverse (tests run as root; PostgreSQL runs as postgres).
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = tempfile::tempdir().expect("temp dir");
    // For a post-mortem by hand: the logs and trees stay (the processes and namespaces go).
    if std::env::var_os("BMFLEET_KEEP_LAB").is_some() {
        eprintln!("kept for BMFLEET_KEEP_LAB: {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn postgres_user() -> nix::unistd::User {
    nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("the postgres user exists (deploy/setup.sh installs PostgreSQL)")
}

/// PostgreSQL 16's server programs, the tests' second major (deploy/setup.sh installs them).
pub const PG16_BIN: &str = "/opt/bmfleet-test/pgserver/pgserver/pginstall/bin";

/// A real PostgreSQL cluster of its own: initdb in a temporary dir, a loopback TCP port with
/// password (scram) authentication, a private socket dir with trust for the administrator.
/// Stopped and removed when dropped.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// TCP port on 127.0.0.1 (and the socket's port).
    pub port: u16,
    bin: PathBuf,
    /// The server's options (port, socket dir, listen address, durability).
    options: String,
    /// The network namespace it runs in.
    netns: Option<String>,
}

impl PgCluster {
    /// Creates and starts a cluster.
    pub fn start() -> Self {
        Self::start_in(None)
    }

    /// Creates and starts a cluster inside a network namespace (its 127.0.0.1 and port are the
    /// namespace's own).
    pub fn start_in(netns: Option<&str>) -> Self {
        Self::start_with(
            netns,
            bmfleet_agent::db::pg::bin_dir(&PostgresConfig::default()),
        )
    }

    /// Creates and starts a cluster of the server programs in `bin` (another major).
    pub fn start_from(bin: PathBuf) -> Self {
        Self::start_with(None, bin)
    }

    /// [`PgCluster::start_from`] inside a network namespace.
    pub fn start_in_from(netns: Option<&str>, bin: PathBuf) -> Self {
        Self::start_with(netns, bin)
    }

    fn start_with(netns: Option<&str>, bin: PathBuf) -> Self {
        let dir = open_tempdir();
        let user = postgres_user();
        let (data, run) = (dir.path().join("data"), dir.path().join("run"));
        std::fs::create_dir(&run).expect("run dir");
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown");
        nix::unistd::chown(&run, Some(user.uid), Some(user.gid)).expect("chown");
        let as_postgres = |program: &str, args: &[&str]| {
            let mut cmd = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "runuser"]);
                    c
                }
                None => Command::new("runuser"),
            };
            let out = cmd
                .args(["-u", "postgres", "--"])
                .arg(bin.join(program))
                .args(args)
                .output()
                .expect("run as postgres");
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data_s = data.display().to_string();
        as_postgres(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
        );
        let port = if netns.is_some() { 5432 } else { free_port() };
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            run.display()
        );
        let log = dir.path().join("log").display().to_string();
        as_postgres(
            "pg_ctl",
            &["-D", &data_s, "-l", &log, "-w", "-o", &options, "start"],
        );
        PgCluster {
            dir,
            port,
            bin,
            options,
            netns: netns.map(str::to_string),
        }
    }

    /// `pg_ctl ACTION` of this cluster as the postgres user (argv; the options it started
    /// with when starting).
    pub fn pg_ctl_argv(&self, action: &str) -> Vec<String> {
        let data = self.dir.path().join("data").display().to_string();
        let mut argv: Vec<String> = ["runuser", "-u", "postgres", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        argv.push(self.bin.join("pg_ctl").display().to_string());
        argv.extend(["-D".into(), data, "-w".into()]);
        if action == "start" {
            let log = self.dir.path().join("log").display().to_string();
            argv.extend(["-l".into(), log, "-o".into(), self.options.clone()]);
        } else {
            argv.extend(["-m".into(), "fast".into()]);
        }
        argv.push(action.into());
        argv
    }

    /// Restarts the cluster (a setting that needs it, e.g. `wal_level`).
    pub fn restart(&self) {
        for action in ["stop", "start"] {
            let argv = self.pg_ctl_here(action);
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .expect("pg_ctl");
            assert!(
                out.status.success(),
                "pg_ctl {action}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Crashes the cluster if it runs (an immediate shutdown: no checkpoint, crash recovery at
    /// the next start) and starts it again after `pause`, as its service manager would;
    /// whether it ran.
    pub fn crash_and_restart(&self, pause: Duration) -> bool {
        let status = self.pg_ctl_here("status");
        let running = Command::new(&status[0])
            .args(&status[1..])
            .output()
            .is_ok_and(|o| o.status.success());
        if !running {
            return false;
        }
        let mut stop = self.pg_ctl_here("stop");
        if let Some(m) = stop.iter().position(|a| a == "fast") {
            stop[m] = "immediate".into();
        }
        let _ = Command::new(&stop[0]).args(&stop[1..]).output();
        std::thread::sleep(pause);
        // As a service manager would: started again until it runs (the agent may be moving
        // the data dir at that moment), five tries a second apart.
        let start = self.pg_ctl_here("start");
        for _ in 0..5 {
            let started = Command::new(&start[0]).args(&start[1..]).output();
            let running = Command::new(&status[0])
                .args(&status[1..])
                .output()
                .is_ok_and(|o| o.status.success());
            if running || started.is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        true
    }

    /// `pg_ctl ACTION` as the tests run it: inside the cluster's namespace.
    fn pg_ctl_here(&self, action: &str) -> Vec<String> {
        let mut argv = self.pg_ctl_argv(action);
        if let Some(ns) = &self.netns {
            let prefix = ["ip", "netns", "exec", ns.as_str()];
            argv.splice(0..0, prefix.iter().map(|s| s.to_string()));
        }
        argv
    }

    /// The agent's settings for this cluster on a target that may follow its origin (data
    /// dir, start and stop commands, a relay dir of its own).
    pub fn standby_settings(&self) -> PostgresConfig {
        PostgresConfig {
            data_dir: Some(self.dir.path().join("data")),
            server_start: self.pg_ctl_argv("start"),
            server_stop: self.pg_ctl_argv("stop"),
            relay_dir: self.dir.path().join("relay"),
            ..self.agent_settings()
        }
    }

    /// The administrator's socket dir.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The cluster's directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL as the administrator; returns psql's unaligned output.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        self.try_sql(database, sql)
            .unwrap_or_else(|e| panic!("psql: {e}"))
    }

    /// Runs SQL as the administrator: psql's unaligned output, or its error.
    pub fn try_sql(&self, database: &str, sql: &str) -> Result<String, String> {
        use std::io::Write;
        // A hostile cluster's copy may make every login load a library: the tests' own
        // administrator clears it, as the agent's does.
        let mut child = Command::new("runuser")
            .env("PGOPTIONS", "-c session_preload_libraries=")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-d", database])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(sql.as_bytes())
            .expect("write SQL");
        let out = child.wait_with_output().expect("psql");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's PostgreSQL settings for this cluster.
    pub fn agent_settings(&self) -> PostgresConfig {
        PostgresConfig {
            bin_dir: Some(self.bin.clone()),
            host: "127.0.0.1".into(),
            port: self.port,
            password: "not-the-password".into(),
            admin_host: self.socket_dir().display().to_string(),
            ..PostgresConfig::default()
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A small, seedable generator (xorshift64*): the fuzz and chaos campaigns replay exactly
/// from their seed.
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        SeededRng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}
