//! BlueMind's manual procedure ("Changer de distribution"), run as its documentation writes
//! it: from the target, against the origin, over real ssh (an sshd in the origin's namespace,
//! root logging in with a key). The only departures, each forced by the lab or by PostgreSQL:
//! every path is under the host's lab data root; bj-data is dumped and restored like bj
//! (BlueMind 4 and later have both); `createdb` names bj as the owner (PostgreSQL 15 no longer
//! lets other users create tables in `public`); the dump goes to the lab's directory, not
//! /tmp/db.sql. The commands run back to back: no operator typing, so this is the manual
//! procedure's best case.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use bmfleet_proto::BLUEMIND_DATA_DIRS;
use bmfleet_tests::lab_fleet::LabFleet;
use bmfleet_tests::ssh::SshAccess;

/// The manual's configuration copies: (recursive, origin path, target path).
const CONFIG_COPIES: &[(bool, &str, &str)] = &[
    (true, "/etc/bm/*", "/etc/bm"),
    (false, "/etc/bm/bm.ini", "/etc/bm/bm.ini"),
    (true, "/etc/bm-hps/*", "/etc/bm-hps"),
    (
        false,
        "/etc/ssl/certs/bm_cert.pem",
        "/etc/ssl/certs/bm_cert.pem",
    ),
    (true, "/var/lib/bm-ca/*", "/var/lib/bm-ca"),
    (
        false,
        "/usr/share/bm-elasticsearch/config/elasticsearch.yml",
        "/usr/share/bm-elasticsearch/config/elasticsearch.yml",
    ),
    (false, "/etc/imapd*", "/etc/"),
    (false, "/etc/cyrus*", "/etc/"),
    (false, "/etc/postfix/main.cf", "/etc/postfix/main.cf"),
    (false, "/etc/postfix/master.cf", "/etc/postfix/master.cf"),
    (
        false,
        "/etc/postfix/master_relay_transport-flat",
        "/etc/postfix/master_relay_transport-flat",
    ),
    (
        false,
        "/etc/postfix/master_relay_transport.db",
        "/etc/postfix/master_relay_transport.db",
    ),
    (
        false,
        "/etc/postfix/transport-flat",
        "/etc/postfix/transport-flat",
    ),
    (
        false,
        "/etc/postfix/transport.db",
        "/etc/postfix/transport.db",
    ),
    (
        false,
        "/etc/postfix/virtual_alias-flat",
        "/etc/postfix/virtual_alias-flat",
    ),
    (
        false,
        "/etc/postfix/virtual_alias.db",
        "/etc/postfix/virtual_alias.db",
    ),
    (
        false,
        "/etc/postfix/virtual_domains-flat",
        "/etc/postfix/virtual_domains-flat",
    ),
    (
        false,
        "/etc/postfix/virtual_domains.db",
        "/etc/postfix/virtual_domains.db",
    ),
    (
        false,
        "/etc/postfix/virtual_mailbox-flat",
        "/etc/postfix/virtual_mailbox-flat",
    ),
    (
        false,
        "/etc/postfix/virtual_mailbox.db",
        "/etc/postfix/virtual_mailbox.db",
    ),
    (true, "/etc/bm-webmail/*", "/etc/bm-webmail/"),
];

/// BlueMind's databases (bj-data since BlueMind 4).
const DATABASES: [&str; 2] = ["bj", "bj-data"];

/// One timed step of the procedure.
#[derive(Debug, Clone)]
pub struct Timed {
    /// What the step is.
    pub name: String,
    /// Seconds from the start of the downtime.
    pub start: f64,
    /// Its duration, seconds.
    pub secs: f64,
}

/// The cold sync and server replacement, timed.
#[derive(Debug, Clone)]
pub struct ColdRun {
    /// Services stopped to services started on the target, seconds.
    pub downtime: f64,
    /// The steps, in order.
    pub steps: Vec<Timed>,
    /// The `psql` restores alone, seconds (the database part of the physical floor).
    pub restore_secs: f64,
}

/// The step that stops the services on both hosts (part of the physical floor).
pub const STOP_STEP: &str = "bmctl stop + postfix stop (origin and target)";
/// The step that moves the service IP (part of the physical floor).
pub const IP_STEP: &str = "origin lets the IP go, target takes it";
/// The step that announces it with `arping`, which waits for the reply an unsolicited ARP
/// never gets (not part of the floor: one frame's sending is).
pub const ANNOUNCE_STEP: &str = "arping announces the move";
/// The step that starts the services on the target (part of the physical floor).
pub const START_STEP: &str = "services start on the target";

/// The manual procedure between one origin and its target.
pub struct Manual<'a> {
    fleet: &'a LabFleet,
    origin: String,
    target: String,
    origin_ip: String,
    ssh_config: PathBuf,
    dir: PathBuf,
    password: String,
}

fn check(what: &str, cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl<'a> Manual<'a> {
    /// Starts sshd on the origin (root may log in with a key made here) and prepares the
    /// target as BlueMind's installation would have: the bj role (with the origin's password,
    /// which bm.ini carries), empty databases, the configuration directories.
    pub fn prepare(fleet: &'a LabFleet, origin: &str, target: &str) -> anyhow::Result<Self> {
        let dir = fleet.dir().join("manual");
        std::fs::create_dir_all(&dir)?;
        let ssh = SshAccess::new(&dir).map_err(anyhow::Error::msg)?;
        ssh.start(&fleet.lab, origin, target)
            .map_err(anyhow::Error::msg)?;
        let origin_ip = fleet.lab.host(origin).ip.to_string();
        let bm_ini = std::fs::read_to_string(fleet.root(origin).join("etc/bm/bm.ini"))?;
        let password = bm_ini
            .lines()
            .find_map(|l| l.strip_prefix("password = "))
            .context("no password in the origin's bm.ini")?
            .to_string();
        fleet.sql(
            target,
            "postgres",
            &format!(
                "CREATE ROLE bj LOGIN PASSWORD '{password}'; CREATE DATABASE bj OWNER bj; CREATE DATABASE \"bj-data\" OWNER bj;"
            ),
        );
        for (_, _, to) in CONFIG_COPIES {
            let local = fleet.root(target).join(to.trim_start_matches('/'));
            let dir = if to.ends_with('/') || !to.contains('.') {
                local
            } else {
                local.parent().map(Path::to_path_buf).unwrap_or(local)
            };
            std::fs::create_dir_all(dir)?;
        }
        Ok(Manual {
            fleet,
            origin: origin.into(),
            target: target.into(),
            origin_ip,
            ssh_config: ssh.ssh_config.clone(),
            dir,
            password,
        })
    }

    /// `root@origin:PATH` under the origin's data root.
    fn remote(&self, path: &str) -> String {
        format!(
            "root@{}:{}",
            self.origin_ip,
            self.fleet
                .root(&self.origin)
                .join(path.trim_start_matches('/'))
                .display()
        )
    }

    /// PATH under the target's data root.
    fn local(&self, path: &str) -> String {
        let mut local = self
            .fleet
            .root(&self.target)
            .join(path.trim_start_matches('/'))
            .display()
            .to_string();
        if path.ends_with('/') && !local.ends_with('/') {
            local.push('/');
        }
        local
    }

    /// Runs `cmd` in `host`'s namespace, as a shell there would (no `ip netns exec` on the
    /// way: its cost is not the procedure's), and checks its status.
    fn exec(&self, host: &str, what: &str, mut cmd: Command) -> anyhow::Result<()> {
        self.fleet
            .lab
            .run_in(host, move || check(what, &mut cmd))
            .map(drop)
    }

    /// `ssh`, `scp` or `rsync` with the lab's client configuration.
    fn ssh_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        match program {
            "rsync" => cmd
                .arg("-e")
                .arg(format!("ssh -F {}", self.ssh_config.display())),
            _ => cmd.arg("-F").arg(&self.ssh_config),
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The seven `rsync -avH --delete root@origsrv:DIR/ DIR/`.
    fn rsync_all(&self, steps: &mut Steps) -> anyhow::Result<()> {
        for dir in BLUEMIND_DATA_DIRS {
            let with_slash = format!("{dir}/");
            let mut rsync = self.ssh_command("rsync");
            rsync
                .args(["-avH", "--delete"])
                .arg(self.remote(&with_slash))
                .arg(self.local(&with_slash))
                .stdout(Stdio::null());
            let what = format!("rsync {dir}");
            steps.run(&what, || self.exec(&self.target, &what, rsync))?;
        }
        Ok(())
    }

    /// The hot sync: the seven rsyncs while the origin serves. Returns seconds.
    pub fn hot_sync(&self) -> anyhow::Result<f64> {
        let mut steps = Steps::new();
        self.rsync_all(&mut steps)?;
        Ok(steps.elapsed())
    }

    /// `bmctl stop` / `service postfix stop` (or start) on a host.
    fn services(&self, host: &str, action: &str) -> anyhow::Result<()> {
        for service in ["bluemind", "postfix"] {
            let what = format!("{service} {action} on {host}");
            self.exec(
                host,
                &what,
                self.fleet.service_command(host, service, action),
            )?;
        }
        Ok(())
    }

    /// `dropdb DB; createdb DB` as postgres on the target.
    fn recreate(&self, db: &str) -> anyhow::Result<()> {
        let pg = self.fleet.pg(&self.target);
        let bin = bmfleet_agent::db::pg::bin_dir(&Default::default());
        for (program, owner) in [("dropdb", None), ("createdb", Some("bj"))] {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"])
                .arg(bin.join(program))
                .arg("-h")
                .arg(pg.socket_dir())
                .args(["-p", &pg.port.to_string()]);
            if let Some(owner) = owner {
                cmd.args(["-O", owner]);
            }
            cmd.arg(db).stdin(Stdio::null());
            self.exec(&self.target, &format!("{program} {db}"), cmd)?;
        }
        Ok(())
    }

    /// `cat DUMP | psql -U bj -h localhost DB` on the target (psql reports SQL errors on
    /// stderr, not in its status: any is a failure here).
    fn restore(&self, db: &str, dump: &Path) -> anyhow::Result<()> {
        let mut psql = Command::new("psql");
        psql.args(["-U", "bj", "-h", "localhost", db])
            .env("PGPASSWORD", &self.password)
            .stdin(std::fs::File::open(dump)?)
            .stdout(Stdio::null());
        let out = self.fleet.lab.run_in(&self.target, move || {
            check(&format!("psql {db}"), &mut psql)
        })?;
        let errors = String::from_utf8_lossy(&out.stderr);
        if errors.contains("ERROR") {
            bail!("psql {db}: {errors}");
        }
        Ok(())
    }

    /// The cold sync and the server replacement, each step timed: downtime runs from the
    /// services' stop to their start on the target.
    pub fn cold_sync_and_cutover(&self, service_ip: &str) -> anyhow::Result<ColdRun> {
        let mut steps = Steps::new();
        steps.run(STOP_STEP, || {
            self.services(&self.origin, "stop")?;
            self.services(&self.target, "stop")
        })?;
        self.rsync_all(&mut steps)?;
        for db in DATABASES {
            let dump = self.dir.join(format!("{db}.sql"));
            let mut ssh = self.ssh_command("ssh");
            ssh.arg(format!("root@{}", self.origin_ip))
                .arg(format!(
                    "PGPASSWORD='{}' pg_dump -U bj -h localhost '{db}'",
                    self.password
                ))
                .stdout(std::fs::File::create(&dump)?);
            let what = format!("ssh … pg_dump {db} > {db}.sql");
            steps.run(&what, || self.exec(&self.target, &what, ssh))?;
        }
        steps.run(
            &format!("scp of the configuration ({} copies)", CONFIG_COPIES.len()),
            || {
                for (recursive, from, to) in CONFIG_COPIES {
                    let mut scp = self.ssh_command("scp");
                    if *recursive {
                        scp.arg("-r");
                    }
                    scp.arg(self.remote(from)).arg(self.local(to));
                    self.exec(&self.target, &format!("scp {from}"), scp)?;
                }
                Ok(())
            },
        )?;
        let mut restore_secs = 0.0;
        for db in DATABASES {
            steps.run(&format!("dropdb {db}; createdb {db}"), || self.recreate(db))?;
            let dump = self.dir.join(format!("{db}.sql"));
            restore_secs += steps.run(
                &format!("cat {db}.sql | psql -U bj -h localhost {db}"),
                || self.restore(db, &dump),
            )?;
        }
        let with_prefix = format!("{service_ip}/24");
        steps.run(IP_STEP, || {
            let mut del = Command::new("ip");
            del.args(["addr", "del", &with_prefix, "dev", "eth0"]);
            self.exec(&self.origin, "ip addr del", del)?;
            let mut add = Command::new("ip");
            add.args(["addr", "add", &with_prefix, "dev", "eth0"]);
            self.exec(&self.target, "ip addr add", add)
        })?;
        steps.run(ANNOUNCE_STEP, || {
            // The neighbours learn the move (bmfleet's agent sends the same frame itself);
            // unsolicited ARP gets no reply, which arping reports as exit status 1.
            let mut arping = Command::new("arping");
            arping.args([
                "-q", "-U", "-c", "1", "-W", "0.05", "-i", "eth0", "-S", service_ip, service_ip,
            ]);
            self.fleet
                .lab
                .run_in(&self.target, move || arping.status())
                .context("arping")
                .map(drop)
        })?;
        steps.run(START_STEP, || self.services(&self.target, "start"))?;
        Ok(ColdRun {
            downtime: steps.elapsed(),
            steps: steps.done,
            restore_secs,
        })
    }
}

impl Drop for Manual<'_> {
    fn drop(&mut self) {
        self.fleet.lab.kill_matching(&self.origin, "sshd");
    }
}

/// Steps timed from a common start.
pub struct Steps {
    started: Instant,
    done: Vec<Timed>,
}

impl Steps {
    fn new() -> Self {
        Steps {
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Runs and times one step; returns its seconds.
    fn run(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
        let start = self.started.elapsed().as_secs_f64();
        let timer = Instant::now();
        f().with_context(|| format!("manual procedure, step '{name}'"))?;
        let secs = timer.elapsed().as_secs_f64();
        self.done.push(Timed {
            name: name.into(),
            start,
            secs,
        });
        Ok(secs)
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
