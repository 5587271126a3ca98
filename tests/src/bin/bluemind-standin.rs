//! BlueMind stand-in for the lab (BlueMind itself cannot be installed here).
//!
//! `bluemind-standin --root DIR --name HOST --service bluemind|postfix start|stop|status|serve`
//! `bluemind-standin --root DIR --name HOST --service postfix --real-mail exec -- COMMAND…`
//!
//! - start: starts `serve` in the background (idempotent); refuses when
//!   `DIR/etc/bm/standin-refuse-start` exists (injected failure).
//! - stop: stops it and waits until it is gone (idempotent). status: exit 0 when running, 3 not.
//! - serve, bluemind: IMAP banner on 143, HTTPS-port banner on 443, BlueMind's API on 8080 and
//!   8090 as BlueMind's sources define it (`bmfleet_tests::bluemind_api`), every call recorded
//!   in `DIR/var/log/standin-api.jsonl`.
//! - serve, postfix: SMTP banner on 25, and mail keeps arriving: a message every
//!   `--deliver-ms` into the cyrus spool (every fifth one hard-linked into a second mailbox),
//!   each listed in `DIR/var/log/standin-delivered.log`, and the mailbox's `cyrus.index`
//!   rewritten in place keeping its size and modification time; every seventh delivery also
//!   expunges an older message (listed in `DIR/var/log/standin-expunged.log`).
//! - serve, bluemind, with `--write-ms`: BlueMind's core writes its databases as it runs: one
//!   transaction on `bj` and one on `bj-data` every `--write-ms`, through a connection that
//!   logs in as `bj` with bm.ini's password (as BlueMind's core does): a mailbox inserted, a
//!   handful of calendar events updated at scattered places and one deleted, ACL rows of a
//!   table without a primary key rewritten, a sequence advanced without a row, a message body
//!   inserted, one updated, and an earlier one deleted. Each committed mailbox is listed in
//!   `DIR/var/log/standin-db.log` once its transaction committed.
//!
//! - with `--real-mail` (the lab's real mail stack): instead of the banners and the stand-in's
//!   deliveries, Debian's real daemons in a mount namespace of their own where this host's root
//!   holds BlueMind's mail paths (`/etc/postfix`, `/var/spool/postfix`, `/var/lib/postfix`,
//!   `/var/log/postfix`, `/var/spool/cyrus`, `/var/lib/cyrus`, `/var/spool/sieve`,
//!   `/run/cyrus`, `/etc/imapd.conf`, `/etc/cyrus.conf`): bluemind runs Cyrus IMAP's
//!   `cyrmaster`, postfix runs Postfix's `master` (which hands mail to Cyrus over LMTP, as
//!   the host's `/etc/postfix` says). `exec` runs a command (postqueue, postsuper) in such a
//!   namespace, as the agent's mail queue commands do on the lab's hosts.
//!
//! A stop (SIGTERM) is graceful, as a real service's: the message being delivered and the
//! transaction in flight finish, then the process exits; nothing is written after.

use std::io::Write;

use bmfleet_tests::append;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

#[derive(Parser)]
struct Args {
    /// The host's data_root.
    #[arg(long)]
    root: PathBuf,
    /// The host's name, shown in banners (so a client can tell who answers).
    #[arg(long)]
    name: String,
    #[arg(long, value_enum)]
    service: Service,
    /// Milliseconds between two arriving messages (postfix; 0: none).
    #[arg(long, default_value_t = 0)]
    deliver_ms: u64,
    /// Milliseconds between two transactions on each BlueMind database (bluemind; 0: none).
    #[arg(long, default_value_t = 0)]
    write_ms: u64,
    /// psql, for the database writes.
    #[arg(long, default_value = "psql")]
    psql: PathBuf,
    /// The real mail stack: a real Cyrus IMAP serves the mail (bluemind), a real Postfix
    /// takes it (postfix), each in the host's mail namespace.
    #[arg(long)]
    real_mail: bool,
    #[arg(value_enum)]
    action: Action,
    /// With `exec`: the command to run in the host's mail namespace (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Service {
    Bluemind,
    Postfix,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Action {
    Start,
    Stop,
    Status,
    Serve,
    /// Runs a command (postqueue, postsuper, chk_cyrus…) in the host's mail namespace, where
    /// BlueMind's mail paths are the host root's; exits with its status.
    Exec,
}

fn service_name(s: Service) -> &'static str {
    match s {
        Service::Bluemind => "bluemind",
        Service::Postfix => "postfix",
    }
}

fn pidfile(args: &Args) -> PathBuf {
    args.root
        .join(format!("run/standin-{}.pid", service_name(args.service)))
}

fn running_pid(args: &Args) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile(args))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Alive and not a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    (state != "Z").then_some(pid)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.action {
        Action::Status => match running_pid(&args) {
            Some(pid) => {
                println!("{} running (pid {pid})", service_name(args.service));
                ExitCode::SUCCESS
            }
            None => {
                println!("{} stopped", service_name(args.service));
                ExitCode::from(3)
            }
        },
        Action::Start => start(&args),
        Action::Stop => stop(&args),
        Action::Serve => serve(&args),
        Action::Exec => exec(&args),
    }
}

fn start(args: &Args) -> ExitCode {
    if running_pid(args).is_some() {
        return ExitCode::SUCCESS;
    }
    if args.root.join("etc/bm/standin-refuse-start").exists() {
        eprintln!(
            "{}: refusing to start (injected failure)",
            service_name(args.service)
        );
        return ExitCode::FAILURE;
    }
    let _ = std::fs::create_dir_all(args.root.join("run"));
    let _ = std::fs::create_dir_all(args.root.join("var/log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.root.join(format!(
            "var/log/standin-{}.log",
            service_name(args.service)
        )));
    let Ok(exe) = std::env::current_exe() else {
        return ExitCode::FAILURE;
    };
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&args.root)
        .args([
            "--name",
            &args.name,
            "--service",
            service_name(args.service),
        ])
        .args(["--deliver-ms", &args.deliver_ms.to_string()])
        .args(["--write-ms", &args.write_ms.to_string()])
        .arg("--psql")
        .arg(&args.psql)
        .args(args.real_mail.then_some("--real-mail"))
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A daemon: not in the process group of whoever started it.
        .process_group(0);
    match log {
        Ok(f) => cmd.stderr(f),
        Err(_) => cmd.stderr(Stdio::null()),
    };
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = std::fs::write(pidfile(args), child.id().to_string());
    // Up when its ports answer, looked at every 2 ms: the bench's floor and bmfleet's
    // StartTarget both include this start, and a coarser look rounds both up by its step.
    let port = if args.service == Service::Bluemind {
        143
    } else {
        25
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("{} did not come up", service_name(args.service));
    // What it said, and what a real Postfix logged.
    for log in [
        format!("var/log/standin-{}.log", service_name(args.service)),
        "var/log/postfix/mail.log".to_string(),
    ] {
        let text = std::fs::read_to_string(args.root.join(&log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "{log}:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    ExitCode::FAILURE
}

fn stop(args: &Args) -> ExitCode {
    if let Some(pid) = running_pid(args) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        // Long enough for the transaction in flight and every Cyrus process to end.
        let deadline = Instant::now() + Duration::from_secs(60);
        while running_pid(args).is_some() {
            if Instant::now() > deadline {
                eprintln!("pid {pid} did not stop");
                return ExitCode::FAILURE;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pidfile(args));
    ExitCode::SUCCESS
}

fn exec(args: &Args) -> ExitCode {
    if args.command.is_empty() {
        eprintln!("exec: name the command after --");
        return ExitCode::FAILURE;
    }
    match in_mail_namespace(&args.root, "exec \"$@\"\n", &args.command).status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("exec: {e}");
            ExitCode::FAILURE
        }
    }
}

fn banner(port: u16, text: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(text.as_bytes());
        }
    });
    Ok(())
}

fn serve(args: &Args) -> ExitCode {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // SIGTERM and SIGINT are waited for below: every thread started from here inherits the
    // mask, so the signal never interrupts a delivery or a transaction halfway.
    let mut stop_signals = nix::sys::signal::SigSet::empty();
    stop_signals.add(nix::sys::signal::Signal::SIGTERM);
    stop_signals.add(nix::sys::signal::Signal::SIGINT);
    if let Err(e) = stop_signals.thread_block() {
        eprintln!("serve: cannot block the stop signals: {e}");
        return ExitCode::FAILURE;
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let name = args.name.clone();
    let mut workers = Vec::new();
    let mut daemon: Option<std::process::Child> = None;
    let result = match args.service {
        Service::Postfix if args.real_mail => {
            start_postfix(&args.root).map(|child| daemon = Some(child))
        }
        Service::Postfix => {
            banner(25, format!("220 {name} ESMTP BlueMind stand-in\r\n")).map(|_| {
                if args.deliver_ms > 0 {
                    let (root, every, stopping) = (
                        args.root.clone(),
                        Duration::from_millis(args.deliver_ms),
                        stopping.clone(),
                    );
                    workers.push(std::thread::spawn(move || deliver(&root, every, &stopping)));
                }
            })
        }
        Service::Bluemind => (if args.real_mail {
            start_cyrus(&args.root).map(|child| daemon = Some(child))
        } else {
            banner(
                143,
                format!("* OK [CAPABILITY IMAP4rev1] {name} BlueMind stand-in ready\r\n"),
            )
        })
        .and_then(|_| {
            banner(
                443,
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                    name.len()
                ),
            )
        })
        .and_then(|_| api(&args.root, 8090))
        .and_then(|_| api(&args.root, 8080))
        .map(|_| {
            if args.write_ms > 0 {
                let (root, psql, every, stopping) = (
                    args.root.clone(),
                    args.psql.clone(),
                    Duration::from_millis(args.write_ms),
                    stopping.clone(),
                );
                workers.push(std::thread::spawn(move || {
                    write_databases(&root, &psql, every, &stopping)
                }));
            }
        }),
    };
    if let Err(e) = result {
        eprintln!("serve: {e}");
        return ExitCode::FAILURE;
    }
    let _ = stop_signals.wait();
    stopping.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.join();
    }
    if let Some(child) = daemon.as_mut() {
        stop_mail_daemon(child);
    }
    ExitCode::SUCCESS
}

/// Mail keeps arriving while the service runs (until `stopping`).
fn deliver(root: &Path, every: Duration, stopping: &std::sync::atomic::AtomicBool) {
    let spool = root.join("var/spool/cyrus/data/user");
    let log_path = root.join("var/log/standin-delivered.log");
    let mut n = std::fs::read_to_string(&log_path)
        .map(|t| t.lines().count())
        .unwrap_or(0) as u64;
    while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        let user = ["alice", "bob", "carol"][(n % 3) as usize];
        let rel = format!("var/spool/cyrus/data/user/{user}/standin-{n}.");
        let body = format!("From: sender@example.net\r\nSubject: arrived #{n}\r\n\r\nbody {n}\r\n");
        let path = root.join(&rel);
        if std::fs::create_dir_all(spool.join(user)).is_ok() && std::fs::write(&path, body).is_ok()
        {
            let mut lines = rel.clone() + "\n";
            if n.is_multiple_of(5) {
                // Delivered to two mailboxes: cyrus links them.
                let other = format!("var/spool/cyrus/data/user/shared/standin-{n}.");
                let _ = std::fs::create_dir_all(spool.join("shared"));
                if std::fs::hard_link(&path, root.join(&other)).is_ok() {
                    lines += &(other + "\n");
                }
            }
            append(&log_path, &lines);
        }
        // Files rewritten in place, keeping their size and (within the second) their
        // modification time, as Cyrus rewrites an index record: what a walk's quick check
        // cannot see. The mailbox's index at every delivery, and each message once, about a
        // second after it arrived (so that some are rewritten only during the hot phase).
        rewrite_in_place(&spool.join(user).join("cyrus.index"), n);
        // (Not the messages linked into a second mailbox: a journal pass cannot move one
        // name of a file that has several, and would walk everything.)
        if let Some(k) = n.checked_sub(25).filter(|k| *k > 0 && !k.is_multiple_of(5)) {
            let owner = ["alice", "bob", "carol"][(k % 3) as usize];
            rewrite_in_place(&spool.join(owner).join(format!("standin-{k}.")), n);
        }
        // A client expunges: every seventh delivery removes an older message of one mailbox
        // (never one linked into a second mailbox), and its index is rewritten again.
        if let Some(k) = n
            .checked_sub(40)
            .filter(|k| *k > 0 && n.is_multiple_of(7) && !k.is_multiple_of(5))
        {
            let owner = ["alice", "bob", "carol"][(k % 3) as usize];
            let rel = format!("var/spool/cyrus/data/user/{owner}/standin-{k}.");
            if std::fs::remove_file(root.join(&rel)).is_ok() {
                append(&root.join("var/log/standin-expunged.log"), &(rel + "\n"));
                rewrite_in_place(&spool.join(owner).join("cyrus.index"), n + 1);
            }
        }
        std::thread::sleep(every);
    }
}

/// BlueMind's mail paths, bound from the host's root in a real mail daemon's mount namespace
/// (directories; created when missing).
const MAIL_DIRS: [&str; 8] = [
    "var/spool/cyrus",
    "var/lib/cyrus",
    "var/spool/sieve",
    "run/cyrus",
    "etc/postfix",
    "var/spool/postfix",
    "var/lib/postfix",
    "var/log/postfix",
];

/// Configuration files bound the same way when the host has them.
const MAIL_FILES: [&str; 2] = ["etc/imapd.conf", "etc/cyrus.conf"];

/// The shell lines that make this mount namespace see `root`'s mail paths at BlueMind's.
fn mail_namespace_script(root: &Path) -> String {
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    // /run and /var/log of this namespace are its own (nothing is created on the host's).
    let mut script =
        String::from("set -e\nmount -t tmpfs lab-run /run\nmount -t tmpfs lab-log /var/log\n");
    for dir in MAIL_DIRS {
        script += &format!(
            "mkdir -p {h} /{dir}\nmount --bind {h} /{dir}\n",
            h = quote(&root.join(dir))
        );
    }
    for file in MAIL_FILES {
        if root.join(file).exists() {
            script += &format!("mount --bind {} /{file}\n", quote(&root.join(file)));
        }
    }
    // Postfix's commands (postsuper…) log as its account, straight into maillog_file when its
    // log daemon is not running (as on a stopped host): the file must exist and be theirs.
    script += "[ -e /var/log/postfix/mail.log ] || install -o postfix -m 0600 /dev/null /var/log/postfix/mail.log\n";
    script
}

/// Runs `script` (after the mail paths' binds) in a mount namespace of its own (util-linux
/// `unshare`); `args` are its `$@`.
fn in_mail_namespace(root: &Path, script: &str, args: &[String]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(mail_namespace_script(root) + script)
        .arg("sh")
        .args(args);
    command
}

/// Starts Cyrus's master in the host's mail namespace (`cyrmaster` in the foreground: the
/// stand-in's child), leading a process group of its own as under a service manager: its
/// shutdown signals its whole group (another host's Cyrus in a shared group died with it).
fn start_cyrus(root: &Path) -> std::io::Result<std::process::Child> {
    let script = "mkdir -p /run/cyrus/socket /var/lib/cyrus/proc\n\
        chown cyrus:mail /run/cyrus /run/cyrus/socket /var/lib/cyrus /var/spool/cyrus /var/spool/sieve /var/lib/cyrus/proc\n\
        exec /usr/sbin/cyrmaster -p /run/cyrus/master.pid\n";
    in_mail_namespace(root, script, &[])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
}

/// Starts Postfix's master in the host's mail namespace, as `postfix start` does (its
/// integrity check creates what the queue lacks), but in the foreground: the stand-in's child,
/// leading its own process group (`postfix stop` ends with a kill of the master's group).
fn start_postfix(root: &Path) -> std::io::Result<std::process::Child> {
    let script = "chown postfix /var/lib/postfix\n/usr/sbin/postfix check\nexec /usr/lib/postfix/sbin/master -d\n";
    in_mail_namespace(root, script, &[])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
}

/// Stops a mail daemon as a service manager would: SIGTERM to its master, then every process
/// left in its mount namespace (an imapd finishing a command outlives the master), until none
/// is left (SIGKILL after 10 s): nothing of it writes once the stop returns.
fn stop_mail_daemon(child: &mut std::process::Child) {
    let signal = |pid: i32, sig| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    };
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let master = child.id().to_string();
    let ours = namespace(&master);
    let ours_too = namespace("self");
    signal(child.id() as i32, nix::sys::signal::Signal::SIGTERM);
    let left = || -> Vec<i32> {
        let (Some(cyrus), false) = (&ours, ours == ours_too) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|pid| namespace(&pid.to_string()).as_ref() == Some(cyrus))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = child.try_wait();
        let pids = left();
        if pids.is_empty() {
            break;
        }
        let sig = if Instant::now() < deadline {
            nix::sys::signal::Signal::SIGTERM
        } else {
            nix::sys::signal::Signal::SIGKILL
        };
        for pid in pids {
            signal(pid, sig);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One BlueMind database's connection: a psql session fed transaction by transaction.
struct Session {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    /// Logs in as bm.ini's `login` with its `password` on 127.0.0.1:5432 (BlueMind's own
    /// connection; `host` in bm.ini is the service IP, which moves).
    fn open(root: &Path, psql: &Path, database: &str) -> std::io::Result<Session> {
        let ini = std::fs::read_to_string(root.join("etc/bm/bm.ini"))?;
        let value = |key: &str| {
            ini.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let mut child = Command::new(psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port=5432 user={} dbname={database}",
                value("login")
            ))
            .env("PGPASSWORD", value("password"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("psql without pipes"));
        };
        Ok(Session {
            child,
            input,
            output: std::io::BufReader::new(output),
        })
    }

    /// Runs `sql` (a whole transaction) and waits until psql says it committed.
    fn commit(&mut self, sql: &str, n: u64) -> std::io::Result<()> {
        use std::io::BufRead;
        writeln!(self.input, "{sql}\n\\echo committed {n}")?;
        self.input.flush()?;
        let done = format!("committed {n}");
        let mut line = String::new();
        loop {
            line.clear();
            if self.output.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("psql ended (see the stand-in's log)"));
            }
            if line.trim_end() == done {
                return Ok(());
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// BlueMind's core writing its databases while it runs (until `stopping`): see the module's
/// documentation. A session that fails is opened again a second later.
fn write_databases(
    root: &Path,
    psql: &Path,
    every: Duration,
    stopping: &std::sync::atomic::AtomicBool,
) {
    let ledger = root.join("var/log/standin-db.log");
    let mut n = std::fs::read_to_string(&ledger)
        .map(|t| t.lines().count())
        .unwrap_or(0) as u64;
    let mut sessions: Option<(Session, Session)> = None;
    while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
        if sessions.is_none() {
            match Session::open(root, psql, "bj")
                .and_then(|bj| Ok((bj, Session::open(root, psql, "bj-data")?)))
            {
                Ok(s) => sessions = Some(s),
                Err(e) => {
                    eprintln!("database writer: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let Some((bj, data)) = sessions.as_mut() else {
            continue;
        };
        n += 1;
        let result = bj.commit(&bj_transaction(n), n).and_then(|_| {
            append(&ledger, &format!("writer-{n}\n"));
            data.commit(&data_transaction(n), n)
        });
        if let Err(e) = result {
            eprintln!("database writer, transaction {n}: {e}");
            sessions = None;
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        std::thread::sleep(every);
    }
}

/// Transaction `n` on bj: what BlueMind's core does to it as mail and clients come and go.
fn bj_transaction(n: u64) -> String {
    format!(
        "BEGIN;\n\
         INSERT INTO t_mailbox (domain_id, login, quota, settings) VALUES (1 + {n} % 5, 'writer-{n}', {n}, jsonb_build_object('n', {n}));\n\
         UPDATE t_calendar_event SET summary = summary || ' ~{n}' WHERE id IN (SELECT 1 + ({n}::bigint * 7919 + k * 104729) % m FROM (SELECT max(id) AS m FROM t_calendar_event) s, generate_series(0, 7) k);\n\
         DELETE FROM t_calendar_event WHERE id = (SELECT 1 + ({n}::bigint * 15485863) % max(id) FROM t_calendar_event);\n\
         UPDATE t_container_acl SET verb = CASE verb WHEN 'Read' THEN 'Write' ELSE 'Read' END WHERE container_id = (SELECT ({n}::bigint * 31) % (max(container_id) + 1) FROM t_container_acl);\n\
         SELECT nextval('t_calendar_event_id_seq');\n\
         COMMIT;"
    )
}

/// Transaction `n` on bj-data: a message body arrives, one is rewritten, an earlier one goes.
fn data_transaction(n: u64) -> String {
    format!(
        "BEGIN;\n\
         INSERT INTO t_message_body VALUES (md5('writer-{n}'), {n}, 'written live {n}');\n\
         UPDATE t_message_body SET preview = preview || ' ~{n}' WHERE guid = md5(({n}::bigint * 7919 % 1000 + 1)::text);\n\
         DELETE FROM t_message_body WHERE guid = md5('writer-' || ({n} - 5)) AND {n} % 3 = 0;\n\
         COMMIT;"
    )
}

/// Changes one byte of `path` (chosen by `n`) keeping its size and modification time.
fn rewrite_in_place(path: &Path, n: u64) {
    let Ok(before) = std::fs::metadata(path) else {
        return;
    };
    let Ok(mut content) = std::fs::read(path) else {
        return;
    };
    if content.is_empty() {
        return;
    }
    let at = (n as usize).wrapping_mul(7919) % content.len();
    content[at] = content[at].wrapping_add(1);
    if std::fs::write(path, &content).is_ok() {
        if let (Ok(file), Ok(time)) = (
            std::fs::File::options().write(true).open(path),
            before.modified(),
        ) {
            let _ = file.set_modified(time);
        }
    }
}

/// BlueMind's API on `port` of every address (bmfleet_tests::bluemind_api).
fn api(root: &Path, port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    bmfleet_tests::bluemind_api::serve(root, listener, port)
}
