//! A whole BlueMind fleet in the network lab: N origin/target pairs and an orchestrator, each
//! host a namespace with the real agent, its own PostgreSQL cluster (bj and bj-data), synthetic
//! BlueMind data, the BlueMind stand-ins, and the origin holding its service IP. Used by the
//! end-to-end tests and by the demo (`bmfleet-lab`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bmfleet_orchestrator::config::AgentEntry;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::TlsFiles;

use crate::lab::Lab;
use crate::{binary, open_tempdir, PgCluster, TestPki};

/// Lab size and data size.
#[derive(Debug, Clone, Copy)]
pub struct LabParams {
    /// Origin/target pairs.
    pub pairs: usize,
    /// Messages per origin spool.
    pub messages: usize,
    /// How big they are.
    pub message_sizes: MessageSizes,
    /// Rows of the biggest table per origin.
    pub db_rows: u64,
    /// A new message arrives on each running origin every this many ms.
    pub deliver_ms: u64,
    /// Each running origin's BlueMind commits a transaction on each of its databases every
    /// this many ms (0: none).
    pub db_write_ms: u64,
    /// Agents are not installed: every host runs sshd instead, the orchestrator has none
    /// configured and serves enrollment, and `enroll_inventory` describes the hosts for
    /// `bmctl fleet enroll`.
    pub enroll: bool,
    /// The pair whose databases follow by logical replication (`db_sync = "logical"`; its
    /// origin runs with `wal_level = logical`); the others take the standby.
    pub logical_pair: Option<usize>,
    /// The logical pair's target runs PostgreSQL 16 ([`crate::PG16_BIN`]) instead of
    /// Debian's 15: a move across majors.
    pub subscriber_pg16: bool,
    /// Each target's `/var/spool` (the spool and five more data dirs) is a filesystem of its
    /// own this many MiB big (ext4 on a loop device), which the chaos campaign fills up.
    pub target_spool_mib: Option<u64>,
    /// The real mail stack: on every host Debian's Postfix takes the mail and hands it to
    /// Debian's Cyrus IMAP over LMTP, each in a mount namespace where the host's root holds
    /// BlueMind's paths (instead of the stand-in's banners and deliveries); a sender host
    /// ("sender") relays the internet's mail to the service IPs with its own Postfix
    /// ([`crate::mail_traffic`] submits it and acts as the mail clients).
    pub real_mail: bool,
    /// The pair whose target is of a newer distribution: its card is `ens18` (the origin's
    /// `eth0`) and netplan keeps its addresses; the others use ifupdown on both sides.
    pub renamed_target_card: Option<usize>,
}

impl Default for LabParams {
    fn default() -> Self {
        LabParams {
            pairs: 3,
            messages: 300,
            message_sizes: MessageSizes::Small,
            db_rows: 2000,
            deliver_ms: 40,
            db_write_ms: 150,
            enroll: false,
            logical_pair: Some(3),
            subscriber_pg16: false,
            target_spool_mib: None,
            renamed_target_card: Some(3),
            real_mail: false,
        }
    }
}

/// The lab fleet. Fields drop in order: databases first, then the lab (every process in it is
/// killed, every namespace deleted), then the files.
pub struct LabFleet {
    pgs: Vec<PgCluster>,
    /// The network lab.
    pub lab: Lab,
    /// Loop-mounted spools, unmounted once the lab's processes are gone.
    mounts: Vec<LoopMount>,
    dir: tempfile::TempDir,
    _pki: TestPki,
    /// The operator's identity (bmctl).
    pub operator: TlsFiles,
    /// The orchestrator's identity (for an engine run in-process, as the benchmark does).
    pub orchestrator: TlsFiles,
    /// Every agent as the orchestrator's configuration lists it.
    pub agents: Vec<AgentEntry>,
    /// Size.
    pub params: LabParams,
    /// ssh into the hosts (enroll labs).
    pub ssh: Option<crate::ssh::SshAccess>,
}

/// One instance's outcome, as `bmctl fleet status --output json` reports it.
#[derive(Debug, Clone)]
pub struct InstanceOutcome {
    /// Instance name.
    pub name: String,
    /// Final phase.
    pub phase: String,
    /// Downtime, seconds.
    pub downtime_seconds: f64,
    /// Bytes moved by all passes.
    pub bytes_moved: u64,
    /// Why it stopped, when it failed or rolled back.
    pub last_error: String,
}

/// The BlueMind version of pair `i`: every third pair runs 4.x (the old firewall call), the
/// others 5.x.
pub fn bluemind_version(i: usize) -> &'static str {
    if i.is_multiple_of(3) {
        "4.9.3"
    } else {
        "5.1.2"
    }
}

/// The service IP of pair `i` (1-based).
pub fn service_ip(i: usize) -> String {
    format!("198.18.0.{}", 100 + i)
}

/// The directory of the files that fill a target's spool filesystem.
const FILLER: &str = "chaos-filler";

/// A small ext4 filesystem on a loop device (util-linux's `mount -o loop`, released at
/// unmount), mounted for the lab's life.
struct LoopMount {
    at: PathBuf,
}

impl LoopMount {
    fn new(image: &Path, at: &Path, mib: u64) -> LoopMount {
        std::fs::create_dir_all(at).expect("mount point");
        let file = std::fs::File::create(image).expect("image");
        file.set_len(mib << 20).expect("image size");
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            let out = Command::new(program).args(args).output().expect(program);
            assert!(
                out.status.success(),
                "{program}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // No blocks kept for root (the agent is root: the disk must really fill up).
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                image.as_os_str(),
            ],
        );
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                at.as_os_str(),
            ],
        );
        LoopMount {
            at: at.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.at).output().is_ok_and(|o| o.status.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, content).expect("write");
}

/// A customer's relay network in every lab instance's mynetworks: a string in BlueMind's
/// configuration, never an address anything is sent to.
pub const CUSTOMER_RELAY: &str = "198.19.42.0/24";

const SCHEMA: &str = "
SET ROLE bj;
CREATE TABLE t_domain (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE t_mailbox (id bigserial PRIMARY KEY, domain_id int REFERENCES t_domain(id), login text, quota bigint, settings jsonb);
CREATE TABLE t_calendar_event (id bigserial PRIMARY KEY, owner bigint, summary text, dtstart timestamptz);
INSERT INTO t_domain (name) SELECT 'd' || i || '.example.net' FROM generate_series(1, 5) i;
INSERT INTO t_mailbox (domain_id, login, quota, settings) SELECT 1 + i % 5, 'user' || i, i * 1024, jsonb_build_object('lang', 'fr') FROM generate_series(1, ROWS / 10) i;
INSERT INTO t_calendar_event (owner, summary, dtstart) SELECT i % 100, 'meeting ' || i, '2026-01-01'::timestamptz + i * interval '1 hour' FROM generate_series(1, ROWS) i;
-- Like 44 of BlueMind's tables, no primary key (logical replication needs an identity).
CREATE TABLE t_container_acl (container_id bigint NOT NULL, subject text, verb text);
CREATE INDEX t_container_acl_container ON t_container_acl (container_id);
INSERT INTO t_container_acl SELECT i / 3, 'user' || i % 1000, 'Read' FROM generate_series(1, ROWS / 10) i;
";

const DATA_SCHEMA: &str = "
SET ROLE bj;
CREATE TABLE t_message_body (guid text PRIMARY KEY, size int, preview text);
INSERT INTO t_message_body SELECT md5(i::text), i % 100000, 'preview ' || i FROM generate_series(1, ROWS) i;
";

impl LabFleet {
    /// Builds the lab: namespaces, databases, data, agents, stand-ins, orchestrator.
    pub fn build(params: LabParams) -> LabFleet {
        bmfleet_proto::install_crypto_provider();
        let mut names = vec!["orch".to_string()];
        for i in 1..=params.pairs {
            names.push(format!("origin-{i}"));
            names.push(format!("target-{i}"));
        }
        if params.real_mail {
            names.push(SENDER.to_string());
        }
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut lab = Lab::new(&name_refs);
        if let Some(pair) = params.renamed_target_card.filter(|p| *p <= params.pairs) {
            lab.rename_card(&format!("target-{pair}"), RENAMED_CARD);
        }
        let dir = open_tempdir();
        let pki = TestPki::new();
        // Enrollment signs with a PKI directory's CA, as `bmctl fleet pki init` makes it.
        let pki_dir = dir.path().join("pki");
        let ssh = params.enroll.then(|| {
            bmfleet_proto::pki::init_dir(&pki_dir).expect("pki init");
            crate::ssh::SshAccess::new(&dir.path().join("ssh")).expect("ssh keys")
        });
        let mut pgs = Vec::new();
        let mut mounts = Vec::new();
        let mut agents_toml = String::new();
        let mut agents = Vec::new();
        for name in names.iter().skip(1).filter(|n| *n != SENDER) {
            let host = lab.host(name).clone();
            let origin = name.starts_with("origin");
            let pair: usize = name
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let root = dir.path().join(name);
            let pg = if params.subscriber_pg16 && !origin && params.logical_pair == Some(pair) {
                PgCluster::start_in_from(Some(&host.ns), crate::PG16_BIN.into())
            } else {
                PgCluster::start_in(Some(&host.ns))
            };
            if let (false, Some(mib)) = (origin, params.target_spool_mib) {
                let image = dir.path().join(format!("{name}-spool.img"));
                mounts.push(LoopMount::new(&image, &root.join("var/spool"), mib));
            }
            let password = format!("generated-{name}-{}", std::process::id());
            seed_host(&root, name, origin, pair, &params, &password);
            if origin && params.logical_pair == Some(pair) {
                pg.sql("postgres", "ALTER SYSTEM SET wal_level = logical;");
                pg.restart();
            }
            if origin {
                pg.sql("postgres", &format!("CREATE ROLE bj LOGIN PASSWORD '{password}'; CREATE DATABASE bj OWNER bj; CREATE DATABASE \"bj-data\" OWNER bj;"));
                let rows = params.db_rows.to_string();
                pg.sql("bj", &SCHEMA.replace("ROWS", &rows));
                pg.sql("bj-data", &DATA_SCHEMA.replace("ROWS", &rows));
            }
            let orchestrator_ip = lab.host("orch").ip;
            let base = agent_base_toml(
                &root,
                name,
                &pg,
                origin,
                &params,
                &orchestrator_ip.to_string(),
            );
            if let Some(ssh) = &ssh {
                write(&dir.path().join(format!("{name}-base.toml")), base);
                ssh.start(&lab, name, "orch").expect("sshd");
            } else {
                let files = pki.issue(name, Role::Agent);
                let tls = format!(
                    "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                );
                write(&dir.path().join(format!("{name}.toml")), base + &tls);
                start_agent(&lab, dir.path(), name);
            }
            if origin {
                // BlueMind runs on the origin, which holds the service IP.
                lab.ip(
                    name,
                    &[
                        "addr",
                        "add",
                        &format!("{}/24", service_ip(pair)),
                        "dev",
                        "eth0",
                    ],
                );
                for service in ["bluemind", "postfix"] {
                    let mut start = lab.command(name, binary("bluemind-standin"));
                    start
                        .args(standin_args(&root, name, service, origin, &params))
                        .arg("start");
                    run_standin(start, &format!("{name} {service}"));
                    if service == "bluemind" && params.real_mail {
                        create_mailboxes(&lab, name);
                    }
                }
            }
            let entry = AgentEntry {
                name: name.clone(),
                address: format!("{}:7443", host.ip),
                data_address: origin.then(|| format!("{}:7444", host.ip)),
            };
            if !params.enroll {
                agents_toml += &format!(
                    "[[agent]]\nname = \"{name}\"\naddress = \"{}\"\n",
                    entry.address
                );
                if let Some(data) = &entry.data_address {
                    agents_toml += &format!("data_address = \"{data}\"\n");
                }
            }
            agents.push(entry);
            pgs.push(pg);
        }
        if params.real_mail {
            let root = dir.path().join(SENDER);
            seed_sender(&root, params.pairs);
            let mut start = lab.command(SENDER, binary("bluemind-standin"));
            start.arg("--root").arg(&root).args([
                "--name",
                SENDER,
                "--service",
                "postfix",
                "--real-mail",
                "start",
            ]);
            run_standin(start, "the sender's Postfix");
        }
        // The switch has talked to every service IP (as a router would have).
        lab.run_in("switch", || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
            for i in 1..=params.pairs {
                let _ = s.send_to(b"hello", format!("{}:9", service_ip(i)));
            }
        });
        let (orch, operator, enrollment) = if params.enroll {
            let issue = |name: &str, role: Role| {
                let files = bmfleet_proto::pki::issue_into_dir(
                    &pki_dir,
                    &bmfleet_proto::pki::IssueRequest::new(name, role, 30),
                )
                .expect("issue");
                TlsFiles {
                    ca: files.ca,
                    cert: files.cert,
                    key: files.key,
                    crl: Some(pki_dir.join(bmfleet_proto::pki::CRL_FILE)),
                }
            };
            (
                issue("orchestrator", Role::Orchestrator),
                issue("operator", Role::Operator),
                format!(
                    "[enrollment]\nlisten = \"0.0.0.0:7446\"\nadvertise = \"{}:7446\"\npki_dir = \"{}\"\n",
                    lab.host("orch").ip,
                    pki_dir.display()
                ),
            )
        } else {
            (
                pki.issue("orchestrator", Role::Orchestrator),
                pki.issue("operator", Role::Operator),
                String::new(),
            )
        };
        let crl = orch
            .crl
            .as_ref()
            .map(|c| format!("crl = \"{}\"\n", c.display()))
            .unwrap_or_default();
        let config = dir.path().join("orchestrator.toml");
        write(
            &config,
            format!(
                "listen = \"0.0.0.0:7400\"\nmetrics_listen = \"0.0.0.0:9464\"\nstate_db = \"{}\"\nhealth_interval_secs = 2\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{crl}{enrollment}{agents_toml}",
                dir.path().join("orchestrator/state.db").display(),
                orch.ca.display(),
                orch.cert.display(),
                orch.key.display()
            ),
        );
        start_orchestrator(&lab, dir.path());
        LabFleet {
            pgs,
            lab,
            mounts,
            dir,
            _pki: pki,
            operator,
            orchestrator: orch,
            agents,
            params,
            ssh,
        }
    }

    /// The inventory `bmctl fleet enroll` takes for this (enroll) lab: every host by its lab
    /// address, its agent's files under its data root, no systemd (the lab's supervisor is the
    /// lab itself), the lab's base settings (stand-in services, PostgreSQL socket…).
    pub fn enroll_inventory(&self) -> String {
        let ssh = self.ssh.as_ref().expect("an enroll lab");
        let mut text = format!(
            "[defaults]\nagent_binary = \"{}\"\nssh_config = \"{}\"\nsupervisor = \"none\"\n",
            binary("bmfleet-agent").display(),
            ssh.ssh_config.display()
        );
        for host in self.lab.hosts().iter().skip(1).filter(|h| h.name != SENDER) {
            let root = self.root(&host.name);
            text += &format!(
                "\n[[host]]\nssh = \"root@{ip}\"\nname = \"{name}\"\nrole = \"{role}\"\n\
                 base = \"{base}\"\nbin_path = \"{root}/usr/local/bin/bmfleet-agent\"\n\
                 config_dir = \"{root}/etc/bmfleet\"\nstate_dir = \"{root}/var/lib/bmfleet-agent\"\n\
                 data_root = \"{root}\"\n",
                ip = host.ip,
                name = host.name,
                role = if host.name.starts_with("origin") { "origin" } else { "target" },
                base = self.dir.path().join(format!("{}-base.toml", host.name)).display(),
                root = root.display(),
            );
        }
        text
    }

    /// SQL as the administrator on a host's cluster (hosts in lab order, orchestrator excluded:
    /// origin-1, target-1, origin-2, …).
    pub fn sql(&self, host: &str, database: &str, sql: &str) -> String {
        self.pg(host).sql(database, sql)
    }

    /// Waits (up to `timeout`) until `origin`'s cluster holds no replication slot, bmfleet
    /// role or publication, and `target`'s is not a standby and holds no subscription or
    /// bmfleet role: what an instance's end leaves. Says what remains otherwise.
    pub fn wait_replication_gone(
        &self,
        origin: &str,
        target: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.sql(
                origin,
                "postgres",
                "SELECT (SELECT count(*) FROM pg_replication_slots) || ' slots, ' || (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%') || ' roles'",
            );
            let standby = self.sql(
                target,
                "postgres",
                "SELECT pg_is_in_recovery() || ', ' || (SELECT count(*) FROM pg_subscription) || ' subscriptions, ' || (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bmfleet_%') || ' roles, ' || (SELECT count(*) FROM pg_replication_slots) || ' slots'",
            );
            let publications = self.sql(origin, "bj", "SELECT count(*) FROM pg_publication");
            if left.trim() == "0 slots, 0 roles"
                && standby.trim() == "false, 0 subscriptions, 0 roles, 0 slots"
                && publications.trim() == "0"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{origin} keeps {} and {} publications; {target} in recovery, subscriptions, \
                     roles, slots: {}",
                    left.trim(),
                    publications.trim(),
                    standby.trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A host's PostgreSQL cluster.
    pub fn pg(&self, host: &str) -> &PgCluster {
        let index = self
            .lab
            .hosts()
            .iter()
            .skip(1)
            .position(|h| h.name == host)
            .unwrap_or_else(|| panic!("no database host {host}"));
        &self.pgs[index]
    }

    /// Runs a BlueMind stand-in service command (`start`, `stop`, `status`) on a host, as its
    /// agent would.
    pub fn service(&self, host: &str, service: &str, action: &str) -> Output {
        let mut command = self.service_command(host, service, action);
        self.lab
            .run_in(host, move || command.output().expect("stand-in"))
    }

    /// The command line of a BlueMind stand-in service command on a host (to run inside the
    /// host's namespace).
    pub fn service_command(&self, host: &str, service: &str, action: &str) -> Command {
        let mut command = Command::new(binary("bluemind-standin"));
        command
            .args(standin_args(
                &self.root(host),
                host,
                service,
                host.starts_with("origin"),
                &self.params,
            ))
            .arg(action);
        command
    }

    /// Files of the lab (configs, logs, hosts' data roots).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A host's data_root.
    pub fn root(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    /// The grants still valid on `host`'s agent, waiting up to `wait` for them to go (the
    /// orchestrator withdraws an instance's grants right after its last transition).
    pub fn valid_grants(&self, host: &str, wait: Duration) -> Vec<String> {
        let db = self
            .root(host)
            .join("var/lib/bmfleet-agent")
            .join(bmfleet_agent::server::JOURNAL_FILE);
        let store = bmfleet_agent::plane::grants::GrantStore::open(&db).expect("grant store");
        let until = std::time::Instant::now() + wait;
        loop {
            let valid = store
                .valid(bmfleet_agent::plane::grants::now_ms())
                .expect("grants");
            if valid.is_empty() || std::time::Instant::now() > until {
                return valid;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs bmctl in the orchestrator's host.
    pub fn bmctl(&self, args: &[&str]) -> Output {
        self.lab
            .command("orch", binary("bmctl"))
            .args(args)
            .env("BMFLEET_ORCHESTRATOR", "127.0.0.1:7400")
            .env("BMFLEET_CA", &self.operator.ca)
            .env("BMFLEET_CERT", &self.operator.cert)
            .env("BMFLEET_KEY", &self.operator.key)
            .output()
            .expect("bmctl")
    }

    /// The fleet file of the lab: every pair, windows around the clock, one canary.
    pub fn fleet_file(&self) -> String {
        self.fleet_file_with_windows(&[("00:00", "12:00"), ("12:00", "00:00")])
    }

    /// The lab's fleet file with these daily windows ("HH:MM" start and end, UTC). Its
    /// pre-window pass always runs two rounds (`pre_window_round_secs = 0`,
    /// `pre_window_rounds = 2`): every lab migration goes through the rounds' path.
    pub fn fleet_file_with_windows(&self, windows: &[(&str, &str)]) -> String {
        let mut text = String::from(
            "[fleet]\nname = \"lab\"\nmax_concurrent_downtime = 2\nmin_stagger_secs = 1\ncanary_count = 1\ncanary_approval = false\npre_window_round_secs = 0\npre_window_rounds = 2\n",
        );
        for (start, end) in windows {
            text += &format!(
                "[[fleet.windows]]\ndays = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\",\"sat\",\"sun\"]\nstart = \"{start}\"\nend = \"{end}\"\ntimezone = \"UTC\"\n"
            );
        }
        for i in 1..=self.params.pairs {
            text += &format!(
                "\n[[instance]]\nname = \"mail-{i}\"\norigin = \"origin-{i}\"\ntarget = \"target-{i}\"\nservice_ip = \"{}/24\"\nbluemind = \"{}\"\n",
                service_ip(i),
                if bluemind_version(i).starts_with('5') { "5.x" } else { "4.x" }
            );
            if self.params.logical_pair == Some(i) {
                text += "db_sync = \"logical\"\n";
            }
        }
        text
    }

    /// Runs one step of instance `mail-{i}` from the orchestrator's host, in-process (the
    /// orchestrator's own code and identity, the real agents), outside any migration: Verify
    /// after a migration, say, to see it refuse a world it must not accept.
    pub fn run_step(
        &self,
        i: usize,
        step: bmfleet_orchestrator::machine::Step,
    ) -> bmfleet_orchestrator::engine::StepResult {
        use bmfleet_orchestrator::engine::{AgentPort, Job};
        use std::sync::Arc;
        let fleet = bmfleet_orchestrator::fleet::FleetFile::parse(&self.fleet_file(), "lab")
            .expect("the lab's fleet file");
        let instance = fleet.instances[i - 1].clone();
        self.lab.run_in("orch", || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let identity =
                    bmfleet_proto::tls::LocalIdentity::load(&self.orchestrator, Role::Orchestrator)
                        .expect("the orchestrator's identity");
                let pool = Arc::new(
                    bmfleet_orchestrator::agents::AgentPool::new(
                        &identity,
                        &self.agents,
                        Duration::from_secs(30),
                    )
                    .expect("agent pool"),
                );
                let clock: Arc<dyn bmfleet_orchestrator::clock::Clock> =
                    Arc::new(bmfleet_orchestrator::clock::SystemClock);
                let agents = bmfleet_orchestrator::agent_steps::GrpcAgents::new(
                    pool,
                    clock,
                    Arc::new(bmfleet_orchestrator::metrics::Metrics::new()),
                );
                agents
                    .run(Job {
                        migration: "lab".into(),
                        step,
                        attempt: 1,
                        operation_id: format!("lab-test/{}/{}/1", instance.name, step.as_str()),
                        instance,
                        bwlimit_kib: 0,
                        deadline_ms: 0,
                        full_pass_operation: None,
                        carry_operation: None,
                        promote_databases: false,
                        logical_databases: false,
                        pre_window_round_ms: 2_000,
                        pre_window_rounds: 1,
                        origin_wal: None,
                        origin_queue_empty: false,
                    })
                    .await
            })
        })
    }

    /// Applies the lab's fleet file and follows `bmctl fleet status` until every instance is
    /// finished; `progress` gets each status table.
    pub fn migrate(
        &self,
        timeout: Duration,
        progress: impl FnMut(&str),
    ) -> Result<Vec<InstanceOutcome>, String> {
        self.apply()?;
        self.follow(timeout, progress)
    }

    /// Waits for the orchestrator's Fleet API (after a start or restart).
    pub fn wait_for_orchestrator(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.bmctl(&["fleet", "status"]);
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("orchestrator.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "the orchestrator did not come up: bmctl said {}; the orchestrator's log ends:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Applies the lab's fleet file.
    pub fn apply(&self) -> Result<(), String> {
        self.apply_text(&self.fleet_file())
    }

    /// Applies a fleet file's text.
    pub fn apply_text(&self, text: &str) -> Result<(), String> {
        self.wait_for_orchestrator()?;
        let fleet = self.dir.path().join("fleet.toml");
        write(&fleet, text);
        let out = self.bmctl(&["fleet", "apply", &fleet.display().to_string()]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(())
    }

    /// The instances as `bmctl fleet status --output json` shows them.
    pub fn instances(&self) -> Vec<serde_json::Value> {
        let out = self.bmctl(&["fleet", "status", "--output", "json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["instances"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Fills a target's loop-mounted `/var/spool` (see [`LabParams::target_spool_mib`]) with
    /// files outside every data dir, while the migration may be writing there; false when it
    /// has none or could not.
    pub fn fill_spool(&self, host: &str) -> bool {
        use std::io::Write;
        let spool = self.root(host).join("var/spool");
        let Some(mount) = self.mounts.iter().find(|m| m.at == spool) else {
            return false;
        };
        let dir = mount.at.join(FILLER);
        if std::fs::create_dir_all(&dir).is_err() {
            return false;
        }
        // Big files while there is room (what a pull writes meanwhile is left a margin)…
        for n in 0..8 {
            let Ok(stat) = nix::sys::statvfs::statvfs(&mount.at) else {
                return false;
            };
            let free = stat.blocks_free() * stat.fragment_size();
            if free < 4 << 20 {
                break;
            }
            let _ = Command::new("fallocate")
                .args(["-l", &(free - (2 << 20)).to_string()])
                .arg(dir.join(n.to_string()))
                .output();
        }
        // … then the last blocks, written until the disk says it is full.
        let Ok(mut last) = std::fs::File::create(dir.join("last")) else {
            return true;
        };
        let block = vec![0u8; 64 << 10];
        for _ in 0..1024 {
            if last
                .write_all(&block)
                .and_then(|()| last.sync_data())
                .is_err()
            {
                return true;
            }
        }
        false
    }

    /// Frees what [`LabFleet::fill_spool`] took.
    pub fn free_spool(&self, host: &str) {
        let _ = std::fs::remove_dir_all(self.root(host).join("var/spool").join(FILLER));
    }

    /// Kills the orchestrator (SIGKILL) and starts it again on the same state.
    pub fn restart_orchestrator(&self) {
        self.lab.kill_matching("orch", "bmfleet-orchestrator");
        start_orchestrator(&self.lab, self.dir.path());
    }

    /// Appends `toml` to the orchestrator's configuration and restarts it with it.
    pub fn extend_orchestrator_config(&self, toml: &str) {
        let path = self.dir.path().join("orchestrator.toml");
        let mut text = std::fs::read_to_string(&path).expect("orchestrator.toml");
        text.push_str(toml);
        std::fs::write(&path, text).expect("orchestrator.toml");
        self.restart_orchestrator();
        self.wait_for_orchestrator()
            .unwrap_or_else(|e| panic!("the orchestrator did not come back: {e}"));
    }

    /// Kills the orchestrator and starts it again with an empty state database (a new
    /// orchestrator that remembers nothing of earlier migrations).
    pub fn restart_orchestrator_forgetting(&self) {
        self.lab.kill_matching("orch", "bmfleet-orchestrator");
        let state = self.dir.path().join("orchestrator");
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(state.join(f));
        }
        start_orchestrator(&self.lab, self.dir.path());
    }

    /// Starts the orchestrator again on the same state (after it was stopped).
    pub fn start_orchestrator(&self) {
        start_orchestrator(&self.lab, self.dir.path());
    }

    /// Kills a host's agent (SIGKILL).
    pub fn kill_agent(&self, host: &str) {
        self.lab.kill_matching(host, "bmfleet-agent");
    }

    /// Starts a host's agent again.
    pub fn start_agent(&self, host: &str) {
        start_agent(&self.lab, self.dir.path(), host);
    }

    /// Follows `bmctl fleet status` until every instance is finished.
    pub fn follow(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(&str),
    ) -> Result<Vec<InstanceOutcome>, String> {
        self.wait_for_orchestrator()?;
        let deadline = Instant::now() + timeout;
        let mut last_table = String::new();
        let mut failures = 0;
        loop {
            let table =
                String::from_utf8_lossy(&self.bmctl(&["fleet", "status"]).stdout).into_owned();
            if table != last_table {
                progress(&table);
                last_table = table;
            }
            let out = self.bmctl(&["fleet", "status", "--output", "json"]);
            // A status call may fail while the lab's machine is busy; ten in a row end it.
            let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
                Ok(v) => {
                    failures = 0;
                    v
                }
                Err(e) => {
                    failures += 1;
                    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    eprintln!("bmctl fleet status failed ({failures}): {e}: {said}");
                    if failures >= 10 {
                        return Err(format!("status: {e}: {said}"));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            let instances = v["instances"].as_array().cloned().unwrap_or_default();
            let finished = |p: &str| matches!(p, "Done" | "RolledBack" | "Failed" | "Aborted");
            if !instances.is_empty()
                && instances
                    .iter()
                    .all(|i| finished(i["phase"].as_str().unwrap_or("")))
            {
                return Ok(instances
                    .iter()
                    .map(|i| {
                        let (s, e) = (
                            i["downtime_start_unix_ms"].as_i64(),
                            i["downtime_end_unix_ms"].as_i64(),
                        );
                        InstanceOutcome {
                            name: i["name"].as_str().unwrap_or_default().to_string(),
                            phase: i["phase"].as_str().unwrap_or_default().to_string(),
                            downtime_seconds: match (s, e) {
                                (Some(s), Some(e)) => (e - s) as f64 / 1000.0,
                                _ => 0.0,
                            },
                            bytes_moved: i["bytes_moved"].as_u64().unwrap_or(0),
                            last_error: i["last_error"].as_str().unwrap_or_default().to_string(),
                        }
                    })
                    .collect());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the migration did not finish in {}s:\n{last_table}",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("log")
}

fn start_agent(lab: &Lab, dir: &Path, name: &str) {
    let mut cmd = lab.command(name, binary("bmfleet-agent"));
    cmd.arg("--config")
        .arg(dir.join(format!("{name}.toml")))
        .stdout(std::process::Stdio::null());
    cmd.stderr(log_file(dir, name));
    lab.spawn(cmd);
}

fn start_orchestrator(lab: &Lab, dir: &Path) {
    let mut cmd = lab.command("orch", binary("bmfleet-orchestrator"));
    cmd.arg("--config").arg(dir.join("orchestrator.toml"));
    cmd.stderr(log_file(dir, "orchestrator"));
    lab.spawn(cmd);
}

fn standin_args(
    root: &Path,
    name: &str,
    service: &str,
    origin: bool,
    params: &LabParams,
) -> Vec<String> {
    let mut args = vec![
        "--root".to_string(),
        root.display().to_string(),
        "--name".into(),
        name.into(),
        "--service".into(),
        service.into(),
    ];
    if origin && service == "postfix" {
        args.extend(["--deliver-ms".into(), params.deliver_ms.to_string()]);
    }
    if params.real_mail {
        args.push("--real-mail".into());
    }
    if origin && service == "bluemind" && params.db_write_ms > 0 {
        let psql = bmfleet_agent::db::pg::bin_dir(&Default::default()).join("psql");
        args.extend([
            "--write-ms".into(),
            params.db_write_ms.to_string(),
            "--psql".into(),
            psql.display().to_string(),
        ]);
    }
    args
}

fn toml_list(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A lab host's agent settings, all but its identity ([tls] comes last, or from enrollment).
fn agent_base_toml(
    root: &Path,
    name: &str,
    pg: &PgCluster,
    origin: bool,
    params: &LabParams,
    orchestrator_ip: &str,
) -> String {
    let standin = binary("bluemind-standin").display().to_string();
    let service = |s: &str, action: &str| {
        let mut argv = vec![standin.clone()];
        argv.extend(standin_args(root, name, s, origin, params));
        argv.push(action.into());
        toml_list(&argv)
    };
    // With the real mail stack Postfix stops first (after its queue drained into Cyrus) and
    // starts last (Cyrus takes its LMTP deliveries from the start).
    let order: &[&str] = if params.real_mail {
        &["postfix", "bluemind"]
    } else {
        &["bluemind", "postfix"]
    };
    let services: String = order
        .iter()
        .map(|s| {
            format!(
                "[[services.service]]\nname = \"{s}\"\nstart = {}\nstop = {}\nstatus = {}\n",
                service(s, "start"),
                service(s, "stop"),
                service(s, "status")
            )
        })
        .collect();
    // Real Postfix: its queue commands run in the host's mail namespace, its maps are
    // rebuilt by the real postmap. The stand-ins have no queue.
    let mail = if params.real_mail {
        format!(
            "[config_set]\npostmap_command = [\"postmap\"]\n[mail_queue]\npostqueue_command = {}\npostsuper_command = {}\ndrain_secs = 5\n",
            toml_list(&mail_exec_argv(root, name, &["postqueue"])),
            toml_list(&mail_exec_argv(root, name, &["postsuper"]))
        )
    } else {
        "[config_set]\npostmap_command = [\"sh\", \"-c\", \"printf 'rebuilt from %s\\n' \\\"$0\\\" > \\\"$0.db\\\"\"]\n[mail_queue]\npostqueue_command = []\npostsuper_command = []\n".to_string()
    };
    let socket = pg.dir().join("run").display().to_string();
    let standby = pg.standby_settings();
    let psql = bmfleet_agent::db::pg::bin_dir(&Default::default())
        .join("psql")
        .display()
        .to_string();
    format!(
        r#"listen = "0.0.0.0:7443"
data_listen = "0.0.0.0:7444"
metrics_listen = "0.0.0.0:9465"
orchestrator_addresses = ["{orchestrator_ip}"]
data_root = "{root}"
state_dir = "{root}/var/lib/bmfleet-agent"
[facts]
bluemind_version_command = ["cat", "{root}/etc/bm/bm-core.version"]
postgresql_version_command = ["runuser", "-u", "postgres", "--", "{psql}", "-h", "{socket}", "-p", "5432", "-XAtc", "SHOW server_version"]
spool_users = ["root"]
{services}[postgresql]
bin_dir = "{pg_bin}"
host = "127.0.0.1"
port = 5432
admin_host = "{socket}"
data_dir = "{pg_data}"
server_start = {pg_start}
server_stop = {pg_stop}
relay_dir = "{pg_relay}"
{mail}[network]
announce_count = 4
announce_period_ms = 4000
{api}"#,
        root = root.display(),
        api = api_auth(name),
        pg_bin = standby.bin_dir.clone().unwrap_or_default().display(),
        pg_data = standby.data_dir.unwrap_or_default().display(),
        pg_start = toml_list(&standby.server_start),
        pg_stop = toml_list(&standby.server_stop),
        pg_relay = standby.relay_dir.display(),
    )
}

/// Even pairs' targets log in as admin0 (with the origin's password: BlueMind's database,
/// and so admin0, comes from the origin); the others use the bm-core token. A call that hangs
/// fails after 5 s (the lab's injected hangs).
fn api_auth(name: &str) -> String {
    let mut section = String::from("[bluemind_api]\nrequest_timeout_secs = 5\n");
    if let Some(n) = name
        .strip_prefix("target-")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| n % 2 == 0)
    {
        section += &format!("admin0_password = \"admin-origin-{n}\"\n");
    }
    section
}

/// Messages per mailbox of a big spool.
const MAILBOX_MESSAGES: usize = 500;

/// How many mailboxes a `messages`-message spool has.
fn mailboxes(messages: usize) -> usize {
    (messages / MAILBOX_MESSAGES).max(3)
}

/// Changes a day of mail makes in each mailbox it touches (10 new messages, 5 deleted, 5
/// re-flagged): the day's changes reach `changes / 20` mailboxes whatever the spool's size, as a
/// bigger server has more users, not busier ones.
const CHANGES_PER_MAILBOX: usize = 20;

/// The mailbox message `m` of a `messages`-message spool lives in: alice, bob and carol for
/// small spools, then u0003, u0004, … so that no mailbox holds more than about 500 messages.
fn mailbox(m: usize, messages: usize) -> String {
    match m % mailboxes(messages) {
        i @ 0..=2 => ["alice", "bob", "carol"][i].to_string(),
        i => format!("u{i:04}"),
    }
}

/// How big a spool's messages are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageSizes {
    /// 0.2–1.1 KB of text each: many files, few bytes (the tests' and BENCHMARKS.md's
    /// instance).
    #[default]
    Small,
    /// As a mail server's are, about 15 KB on average: 80 % of 2–12 KB (text, HTML), 18 % of
    /// 12–40 KB (small attachments), 2 % of 40–400 KB (documents, photos), with bodies of
    /// base64-like lines that do not compress (as attachments do not).
    Realistic,
}

/// splitmix64: a well-spread 64-bit value for `x` (the same on every host).
fn spread(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Message `m`'s text (the same on every host).
fn message(m: usize, sizes: MessageSizes) -> Vec<u8> {
    let head = format!("From: a@example.net\r\nSubject: {m}\r\n\r\n");
    let body = match sizes {
        MessageSizes::Small => 200 + m % 900,
        MessageSizes::Realistic => {
            let r = spread(m as u64);
            let (class, within) = (r % 100, (r >> 8) as usize);
            match class {
                0..=79 => 2_000 + within % 10_000,
                80..=97 => 12_000 + within % 28_000,
                _ => 40_000 + within % 360_000,
            }
        }
    };
    let mut text = head.into_bytes();
    text.reserve(body + body / 76 * 2 + 2);
    match sizes {
        MessageSizes::Small => text.extend(std::iter::repeat_n(b'x', body)),
        MessageSizes::Realistic => {
            const ALPHABET: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut state = spread(!(m as u64));
            for i in 0..body {
                if i % 8 == 0 {
                    state = spread(state);
                }
                text.push(ALPHABET[((state >> ((i % 8) * 6)) & 63) as usize]);
                if i % 76 == 75 {
                    text.extend_from_slice(b"\r\n");
                }
            }
        }
    }
    text.extend_from_slice(b"\r\n");
    text
}

/// A cyrus-like spool: `messages` messages spread over mailboxes, every seventh one also
/// hard-linked into the shared mailbox (cyrus's single-instance store), and a `cyrus.index`
/// per mailbox (64 bytes of flags per message). Messages arrived over the past year (their
/// modification times), as in a real spool.
fn seed_spool(root: &Path, messages: usize, sizes: MessageSizes, real_mail: bool) {
    use std::io::Write;
    let now = std::time::SystemTime::now();
    let spool = root.join("var/spool/cyrus/data/user");
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for m in 0..messages {
        // Beside a real Cyrus, the old spool lies in dirs of its own (Cyrus writes its users'
        // mailboxes itself).
        let user = match real_mail {
            true => format!("seed-{}", mailbox(m, messages)),
            false => mailbox(m, messages),
        };
        let dir = spool.join(&user);
        let count = counts.entry(user).or_insert(0);
        if *count == 0 {
            std::fs::create_dir_all(&dir).expect("mailbox");
        }
        *count += 1;
        let path = dir.join(format!("{m}."));
        let age = 365 * 86_400 * (messages - m) as u64 / messages as u64;
        let mut file = std::fs::File::create(&path).expect("message");
        file.write_all(&message(m, sizes)).expect("message");
        file.set_modified(now - Duration::from_secs(age))
            .expect("mtime");
        if m % 7 == 0 {
            let shared = spool.join("shared");
            std::fs::create_dir_all(&shared).expect("shared");
            std::fs::hard_link(&path, shared.join(format!("{m}."))).expect("hard link");
        }
    }
    for (user, count) in counts {
        if !real_mail {
            write(&spool.join(user).join("cyrus.index"), vec![0u8; 64 * count]);
        }
    }
}

/// Files whose attributes a migration must keep, in the origin's spool: a message with a
/// `user.` extended attribute and an access ACL, a mailbox dir with a default ACL, a sparse
/// file (64 MiB apparent, 4 KiB of data). The final pass's manifest gate compares them.
pub const ODD_FILES: [&str; 3] = [
    "var/spool/cyrus/data/user/odd/1.",
    "var/spool/cyrus/data/user/odd",
    "var/spool/cyrus/data/odd.sparse",
];

fn seed_odd_files(root: &Path) {
    let [mail, dir, sparse] = ODD_FILES.map(|f| root.join(f));
    write(&mail, "Subject: odd\r\n\r\nattributes\r\n");
    let text = |p: &Path| p.to_str().expect("path").to_string();
    crate::tool(
        "setfattr",
        &["-n", "user.bmfleet.flag", "-v", "seen", &text(&mail)],
    );
    crate::tool("setfacl", &["-m", "u:nobody:r", &text(&mail)]);
    crate::tool("setfacl", &["-d", "-m", "u:nobody:rwx", &text(&dir)]);
    let file = std::fs::File::create(&sparse).expect("sparse file");
    file.set_len(64 << 20).expect("sparse file");
    use std::os::unix::fs::FileExt;
    file.write_at(&[1u8; 4096], 32 << 20).expect("sparse file");
    // Written a month ago, like the rest of the spool: the final pass's gate compares them by
    // size, mtime and attributes, and reads only what changed within the hour.
    let month_ago = std::time::SystemTime::now() - Duration::from_secs(30 * 86_400);
    for f in [&mail, &sparse] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .and_then(|f| f.set_modified(month_ago))
            .expect("mtime");
    }
}

/// What [`churn`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Churn {
    /// New messages.
    pub new: u64,
    /// Deleted messages.
    pub deleted: u64,
    /// Messages whose flags changed (their mailbox's `cyrus.index` is rewritten).
    pub flagged: u64,
    /// Files written (new messages and rewritten indexes).
    pub files_written: u64,
    /// Bytes of the files written.
    pub bytes_written: u64,
}

/// A day of mail on a seeded spool of `messages` messages, the same on every host given the
/// same arguments: `fraction` of the messages change, half as new messages, a quarter deleted,
/// a quarter with new flags (cyrus rewrites the mailbox's index, not the message),
/// [`CHANGES_PER_MAILBOX`] changes in each mailbox touched: the same number of changes on a
/// bigger spool writes the same bytes. New messages are of `sizes`, as the seeded ones are.
pub fn churn(root: &Path, messages: usize, sizes: MessageSizes, fraction: f64) -> Churn {
    let spool = root.join("var/spool/cyrus/data/user");
    let changed = ((messages as f64 * fraction).round() as usize).max(4);
    let mailboxes = mailboxes(messages);
    let active = (changed / CHANGES_PER_MAILBOX).clamp(1, mailboxes);
    let mut out = Churn::default();
    let mut flagged = std::collections::BTreeSet::new();
    for k in 0..changed {
        // Changes come in fours (two new messages, one deleted, one re-flagged), group j in
        // mailbox j mod active; message m is that mailbox's (4·round + k mod 4)-th: one-to-one
        // in k, the same messages on every host.
        let (j, kind) = (k / 4, k % 4);
        let (i, round) = (j % active, j / active);
        let m = (i + mailboxes * (4 * round + kind)) % messages.max(1);
        let user = mailbox(m, messages);
        match kind {
            0 | 1 => {
                let n = messages + k;
                let body = message(n, sizes);
                write(&spool.join(&user).join(format!("{n}.")), &body);
                out.new += 1;
                out.files_written += 1;
                out.bytes_written += body.len() as u64;
            }
            2 => {
                if std::fs::remove_file(spool.join(&user).join(format!("{m}."))).is_ok() {
                    out.deleted += 1;
                }
            }
            _ => {
                out.flagged += 1;
                flagged.insert(user);
            }
        }
    }
    for user in flagged {
        let index = spool.join(&user).join("cyrus.index");
        let mut bytes = std::fs::read(&index).unwrap_or_default();
        for b in bytes.iter_mut().step_by(64) {
            *b = b.wrapping_add(1);
        }
        out.files_written += 1;
        out.bytes_written += bytes.len() as u64;
        write(&index, bytes);
    }
    out
}

/// A day of database changes on an origin, the same on every host with the same `rows`:
/// `fraction` of the rows of bj-data's biggest table new, as many of bj's events updated and
/// a tenth of that deleted, a few mailboxes added, `fraction` of the ACL rows (a table
/// without a primary key) updated and a tenth of that deleted.
/// Where a day's database changes land in the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DbChurn {
    /// Together: the first rows updated, the last deleted, new ones appended (few blocks).
    Clustered,
    /// Scattered over every table's blocks, as BlueMind's flag and folder updates are: every
    /// n-th row updated, every n-th deleted, new ones appended (most blocks touched).
    Scattered,
}

/// A day of BlueMind database changes on `pg`'s bj and bj-data: `fraction` of the rows
/// (at least 10) inserted, updated and deleted, where `profile` puts them.
pub fn churn_databases(pg: &PgCluster, rows: u64, fraction: f64, profile: DbChurn) {
    let changed = ((rows as f64 * fraction).round() as u64).max(10);
    // Scattered: every `step`-th row, across the whole table.
    let step = (rows / changed).max(1);
    let (updated, deleted, acl_updated, acl_deleted, bodies_updated) = match profile {
        DbChurn::Clustered => (
            format!("id <= {changed}"),
            format!("id > {rows} - {}", changed / 10),
            format!("container_id < {}", (changed / 30).max(1)),
            format!(
                "container_id >= {rows} / 30 - {}",
                (changed / 30).max(1) / 10
            ),
            "false".to_string(),
        ),
        DbChurn::Scattered => (
            format!("id % {step} = 1"),
            format!("id % {} = 2", step * 10),
            format!("container_id % {step} = 3"),
            format!("container_id % {} = 4", step * 10),
            // Every step-th body, by its key's hash (bodies have no serial id).
            format!("('x' || substr(guid, 1, 8))::bit(32)::int % {step} = 0"),
        ),
    };
    pg.sql(
        "bj-data",
        &format!(
            "SET ROLE bj; INSERT INTO t_message_body SELECT md5('day' || i), i % 100000, 'new ' || i \
             FROM generate_series(1, {changed}) i; \
             UPDATE t_message_body SET preview = preview || ' (read)' WHERE {bodies_updated};"
        ),
    );
    pg.sql(
        "bj",
        &format!(
            "SET ROLE bj; UPDATE t_calendar_event SET summary = summary || ' (moved)' WHERE {updated}; \
             DELETE FROM t_calendar_event WHERE {deleted}; \
             INSERT INTO t_mailbox (domain_id, login, quota) SELECT 1, 'day' || i, 0 FROM generate_series(1, 10) i; \
             UPDATE t_container_acl SET verb = 'Write' WHERE {acl_updated}; \
             DELETE FROM t_container_acl WHERE {acl_deleted};"
        ),
    );
}

/// A real Cyrus's configuration as BlueMind lays it out (partition in /var/spool/cyrus/data,
/// its databases in /var/lib/cyrus, sieve scripts in /var/spool/sieve); any password is
/// accepted (`alwaystrue`: the lab's clients are the test's own), plain LOGIN allowed.
const CYRUS_IMAPD_CONF: &str = "configdirectory: /var/lib/cyrus
partition-default: /var/spool/cyrus/data
sievedir: /var/spool/sieve
admins: cyrus
allowplaintext: yes
sasl_pwcheck_method: alwaystrue
sasl_mech_list: PLAIN LOGIN
unixhierarchysep: yes
altnamespace: yes
lmtpsocket: /run/cyrus/socket/lmtp
idlesocket: /run/cyrus/socket/idle
notifysocket: /run/cyrus/socket/notify
autocreate_post: yes
autocreate_quota: 0
virtdomains: off
";

/// Cyrus's services: IMAP on every address of the host, LMTP on its unix socket.
const CYRUS_CONF: &str = "START {
  recover cmd=\"ctl_cyrusdb -r\"
}
SERVICES {
  imap cmd=\"imapd\" listen=\"143\" prefork=0 maxchild=50
  lmtpunix cmd=\"lmtpd\" listen=\"/run/cyrus/socket/lmtp\" prefork=0 maxchild=20
}
EVENTS {
}
DAEMON {
}
";

/// The sender host's name (the internet beside the fleet, with the real mail stack).
pub const SENDER: &str = "sender";

/// The sender's address: the lab's last host (after the orchestrator and the pairs).
pub fn sender_ip(pairs: usize) -> String {
    format!("198.18.0.{}", 2 * pairs + 2)
}

/// The mail domain of pair `i`'s instance (its users: alice, bob, carol).
pub fn mail_domain(i: usize) -> String {
    format!("mail-{i}.lab.example")
}

/// The users of every lab instance's mail.
pub const MAIL_USERS: [&str; 3] = ["alice", "bob", "carol"];

/// The recipient every lab instance's Postfix holds (`check_recipient_access` … HOLD): its
/// mail stays in the hold queue, and must still be there after a migration.
pub const HELD_USER: &str = "held";

/// Every lab instance's mailboxes besides its users': the held recipient's, and the
/// postmaster's (Postfix's own notices, e.g. of a full disk, go there, as an administrator's
/// alias sends them).
pub const SERVICE_MAILBOXES: [&str; 2] = [HELD_USER, "postmaster"];

/// A domain whose mail server is down: the lab instances' transport sends it to an address
/// no host holds, so its mail stays deferred in the queue.
pub const UNREACHABLE_DOMAIN: &str = "unreachable.example";

/// The parts of Debian's Postfix package under /etc/postfix that `postfix check` reads
/// (as every host has them, whatever BlueMind configured).
fn debian_postfix_files(root: &Path) {
    std::fs::create_dir_all(root.join("etc/postfix")).expect("etc/postfix");
    for file in [
        "postfix-files",
        "dynamicmaps.cf",
        "postfix-files.d",
        "dynamicmaps.cf.d",
    ] {
        let from = Path::new("/etc/postfix").join(file);
        if from.exists() {
            crate::tool(
                "cp",
                &[
                    "-a",
                    from.to_str().expect("path"),
                    root.join("etc/postfix").to_str().expect("path"),
                ],
            );
        }
    }
}

/// The lab users' mailboxes on `host`'s running Cyrus, made by its administrator as BlueMind
/// makes a user's (before any mail or login: Cyrus's own autocreation on the first delivery
/// and the first login, racing each other, would make two).
fn create_mailboxes(lab: &Lab, host: &str) {
    let made: Result<(), String> = lab.run_in(host, || {
        let mut admin = crate::mail::Imap::login(([127, 0, 0, 1], 143).into(), "cyrus", "lab")?;
        for user in MAIL_USERS.iter().chain(&SERVICE_MAILBOXES) {
            admin.command(&format!("CREATE user/{user}"))?;
        }
        Ok(())
    });
    made.unwrap_or_else(|e| panic!("{host}'s mailboxes: {e}"));
}

/// A target as Debian's postfix package leaves it: a main.cf of the distribution's (replaced
/// by the origin's at cold sync) and the queue's directories, made by Postfix itself
/// (`postfix check` in the host's mail namespace), owned by its account.
fn postfix_package_install(root: &Path, name: &str) {
    write(
        &root.join("etc/postfix/main.cf"),
        format!("compatibility_level = 3.6\nmyhostname = {name}.lab.example\nmydestination = $myhostname, localhost\n{POSTFIX_LAB_SETTINGS}"),
    );
    write(&root.join("etc/postfix/master.cf"), POSTFIX_MASTER_CF);
    std::fs::create_dir_all(root.join("var/lib/postfix")).expect("postfix data dir");
    crate::tool(
        "chown",
        &[
            "postfix",
            root.join("var/lib/postfix").to_str().expect("path"),
        ],
    );
    let argv = mail_exec_argv(root, name, &["postfix", "check"]);
    let mut check = Command::new(&argv[0]);
    check.args(&argv[1..]);
    run_standin(check, &format!("postfix check on {name}"));
}

/// The argv running `command` in host `name`'s mail namespace, where its `root` holds
/// BlueMind's mail paths (`bluemind-standin … exec --`): as the agent's mail queue commands
/// and the checks run Postfix's and Cyrus's tools on a lab host.
pub fn mail_exec_argv(root: &Path, name: &str, command: &[&str]) -> Vec<String> {
    let mut argv = vec![
        binary("bluemind-standin").display().to_string(),
        "--root".into(),
        root.display().to_string(),
    ];
    argv.extend(
        [
            "--name",
            name,
            "--service",
            "postfix",
            "--real-mail",
            "exec",
            "--",
        ]
        .iter()
        .chain(command)
        .map(|w| w.to_string()),
    );
    argv
}

/// Runs a stand-in command of the lab's setup, which must succeed (`what` names it).
fn run_standin(mut command: Command, what: &str) {
    let out = command.output().expect("stand-in");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Postfix's services, as Debian's master.cf lists them but none chrooted (the lab's queue
/// is bound into a mount namespace; a chroot would need its own copies of the host's files).
const POSTFIX_MASTER_CF: &str = "smtp      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// What keeps the lab's Postfixes inside the lab: no DNS (numeric next hops only), no
/// client name lookups, nothing relayed beyond the transport maps, logs in a file.
const POSTFIX_LAB_SETTINGS: &str = "
# The lab: no DNS, nothing sent beyond the lab's hosts, logs in a file.
inet_protocols = ipv4
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtpd_peername_lookup = no
default_transport = retry:the lab relays nowhere else
maillog_file = /var/log/postfix/mail.log
";

/// An origin's Postfix as BlueMind configures it: main.cf from BlueMind's template
/// (parent/mailbackend/net.bluemind.backend.postfix/templates/main.cf in BlueMind's sources)
/// and its maps as `-flat` files rebuilt by postmap (PostfixPaths.java: `/etc/postfix/*-flat`),
/// the transport naming each mailbox's LMTP (TransportMap.java writes `lmtp:HOST:2400`,
/// BlueMind's own LMTP in front of Cyrus; in the lab, Cyrus's LMTP socket). Left out: TLS,
/// SASL, the milter and the tcp maps, which BlueMind's core serves.
fn seed_postfix(root: &Path, pair: usize, pairs: usize) {
    let domain = mail_domain(pair);
    write(
        &root.join("etc/postfix/main.cf"),
        format!(
            "smtpd_banner = $myhostname ESMTP $mail_name (BlueMind)
biff = no
compatibility_level = 2
append_dot_mydomain = no
myhostname = mail-{pair}.example.net
myorigin = $myhostname
relayhost =
alias_maps =
local_recipient_maps =
mydestination = localhost, $myhostname
mynetworks = 127.0.0.0/8
virtual_transport = error:mailbox does not exist
virtual_mailbox_domains = hash:/etc/postfix/virtual_domains
virtual_mailbox_maps = hash:/etc/postfix/virtual_mailbox
virtual_alias_maps = hash:/etc/postfix/virtual_alias
transport_maps = hash:/etc/postfix/transport, hash:/etc/postfix/master_relay_transport
recipient_delimiter = +
smtpd_recipient_restrictions = check_recipient_access hash:/etc/postfix/hold_recipients, permit_mynetworks, reject_unauth_destination
disable_vrfy_command = yes
smtputf8_enable = no
{POSTFIX_LAB_SETTINGS}"
        ),
    );
    write(&root.join("etc/postfix/master.cf"), POSTFIX_MASTER_CF);
    let users: Vec<String> = MAIL_USERS
        .iter()
        .chain(&SERVICE_MAILBOXES)
        .map(|u| format!("{u}@{domain}"))
        .collect();
    let lines =
        |value: &str| -> String { users.iter().map(|u| format!("{u} {value}\n")).collect() };
    for (map, text) in [
        ("virtual_domains", format!("{domain} OK\n")),
        ("virtual_mailbox", lines("OK")),
        (
            "virtual_alias",
            format!("postmaster@mail-{pair}.example.net postmaster@{domain}\n"),
        ),
        ("transport", lines("lmtp:unix:/run/cyrus/socket/lmtp")),
        (
            "master_relay_transport",
            format!(
                "{UNREACHABLE_DOMAIN} smtp:[198.18.1.254]\nsender.lab.example smtp:[{}]\n",
                sender_ip(pairs)
            ),
        ),
        ("hold_recipients", format!("{HELD_USER}@{domain} HOLD\n")),
    ] {
        let flat = root.join(format!("etc/postfix/{map}-flat"));
        write(&flat, text);
        crate::tool("postmap", &[flat.to_str().expect("path")]);
        std::fs::rename(
            root.join(format!("etc/postfix/{map}-flat.db")),
            root.join(format!("etc/postfix/{map}.db")),
        )
        .expect("postmap's map");
    }
}

/// The sender host's Postfix: mail submitted on its loopback is relayed to each instance's
/// service IP, and mail that could not go is retried every second or two (so that a window's
/// deferred mail reaches the target within seconds of the cutover).
fn seed_sender(root: &Path, pairs: usize) {
    debian_postfix_files(root);
    write(
        &root.join("etc/postfix/main.cf"),
        format!(
            "compatibility_level = 3.6
myhostname = sender.lab.example
mydestination =
mynetworks = 127.0.0.0/8
relay_domains =
smtpd_relay_restrictions = permit_mynetworks, reject
transport_maps = texthash:/etc/postfix/transport
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 2s
{POSTFIX_LAB_SETTINGS}"
        ),
    );
    write(&root.join("etc/postfix/master.cf"), POSTFIX_MASTER_CF);
    let transport: String = (1..=pairs)
        .map(|i| format!("{} smtp:[{}]\n", mail_domain(i), service_ip(i)))
        .collect();
    write(&root.join("etc/postfix/transport"), transport);
}

/// The card of the renamed target (LabParams::renamed_target_card).
pub const RENAMED_CARD: &str = "ens18";

/// Synthetic BlueMind data and configuration on one host.
fn seed_host(
    root: &Path,
    name: &str,
    origin: bool,
    pair: usize,
    params: &LabParams,
    password: &str,
) {
    for d in bmfleet_proto::BLUEMIND_DATA_DIRS {
        std::fs::create_dir_all(root.join(d.trim_start_matches('/'))).expect("data dir");
    }
    // The host's network configuration: Debian's ifupdown, or on the newer target of the
    // renamed pair netplan for its `ens18` (as Ubuntu's installer writes it).
    let address = format!(
        "198.18.0.{}/24",
        if origin { 2 * pair } else { 2 * pair + 1 }
    );
    if !origin && params.renamed_target_card == Some(pair) {
        write(
            &root.join("etc/netplan/50-cloud-init.yaml"),
            format!(
                "network:\n  version: 2\n  ethernets:\n    {RENAMED_CARD}:\n      addresses:\n        - {address}\n"
            ),
        );
    } else {
        write(
            &root.join("etc/network/interfaces"),
            format!(
                "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address {address}\n"
            ),
        );
    }
    write(
        &root.join("etc/bm/bm-core.version"),
        format!("{}\n", bluemind_version(pair)),
    );
    write(
        &root.join("etc/bm/bm-core.tok"),
        format!("token-of-{name}\n"),
    );
    write(&root.join("etc/bm/admin0.pw"), format!("admin-{name}\n"));
    if params.real_mail {
        // Every host runs its distribution's Postfix package.
        debian_postfix_files(root);
        if !origin {
            postfix_package_install(root, name);
        }
    }
    if !origin {
        return;
    }
    write(
        &root.join("etc/bm/bm.ini"),
        format!(
            "[global]\nhost = {}\ndbtype = PGSQL\nlogin = bj\npassword = {password}\n",
            service_ip(pair)
        ),
    );
    write(
        &root.join("etc/bm/standin-configuration.json"),
        // BlueMind's systemconf table as the origin's sanitizer left it (its own /32 added) with
        // a customer relay network, and a key of the table beside bm.ini's.
        format!(
            "{{\"mynetworks\": \"127.0.0.0/8, 198.18.0.{}/32, {CUSTOMER_RELAY}\", \
             \"external_url\": \"mail-{pair}.example.net\"}}",
            2 * pair
        ),
    );
    if params.real_mail {
        seed_postfix(root, pair, params.pairs);
    } else {
        write(
            &root.join("etc/postfix/main.cf"),
            format!("myhostname = mail-{pair}.example.net\n"),
        );
        write(
            &root.join("etc/postfix/master.cf"),
            "smtp inet n - y - - smtpd\n",
        );
        for map in [
            "transport",
            "virtual_domains",
            "virtual_alias",
            "virtual_mailbox",
            "master_relay_transport",
        ] {
            write(
                &root.join(format!("etc/postfix/{map}-flat")),
                format!("example.net {map}\n"),
            );
            write(
                &root.join(format!("etc/postfix/{map}.db")),
                "origin libdb bytes",
            );
        }
    }
    if params.real_mail {
        write(&root.join("etc/imapd.conf"), CYRUS_IMAPD_CONF);
        write(&root.join("etc/cyrus.conf"), CYRUS_CONF);
    } else {
        write(
            &root.join("etc/imapd.conf"),
            "partition-default: /var/spool/cyrus/data\n",
        );
        write(&root.join("etc/cyrus.conf"), "SERVICES {}\n");
    }
    // The rest of the manual's configuration list.
    for (file, text) in [
        ("etc/bm-hps/hps.ini", "[hps]\nport = 8079\n"),
        ("etc/ssl/certs/bm_cert.pem", "-----BEGIN CERTIFICATE-----\n"),
        ("var/lib/bm-ca/cacert.pem", "-----BEGIN CERTIFICATE-----\n"),
        (
            "usr/share/bm-elasticsearch/config/elasticsearch.yml",
            "cluster.name: bluemind\n",
        ),
        ("etc/bm-webmail/bm-webmail.ini", "[webmail]\n"),
    ] {
        write(&root.join(file), format!("{text}# {name}\n"));
    }
    seed_spool(
        root,
        params.messages,
        params.message_sizes,
        params.real_mail,
    );
    seed_odd_files(root);
    if !params.real_mail {
        // A stand-in for Cyrus's mailbox list (a real Cyrus makes its own).
        write(&root.join("var/lib/cyrus/mailboxes.db"), vec![7u8; 4096]);
    }
    write(
        &root.join("var/spool/sieve/alice/default.sieve"),
        "require \"fileinto\";\nkeep;\n",
    );
    write(
        &root.join("var/spool/bm-hsm/archive/1.bin"),
        vec![1u8; 10_000],
    );
    write(
        &root.join("var/spool/bm-elasticsearch/nodes/0/index"),
        vec![2u8; 20_000],
    );
    write(&root.join("var/spool/bm-docs/doc.pdf"), vec![3u8; 5_000]);
    write(
        &root.join("var/spool/bm-filehosting/share/file.txt"),
        "shared file\n",
    );
    if params.real_mail {
        // Cyrus's own trees are its service account's, as the package leaves them.
        for dir in ["var/spool/cyrus", "var/lib/cyrus", "var/spool/sieve"] {
            crate::tool(
                "chown",
                &["-R", "cyrus:mail", root.join(dir).to_str().expect("path")],
            );
        }
    }
}
