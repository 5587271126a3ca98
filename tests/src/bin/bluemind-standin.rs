//! BlueMind stand-in for the lab (BlueMind itself cannot be installed here).
//!
//! `bluemind-standin --root DIR --name HOST --service bluemind|postfix start|stop|status|serve`
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
//!   rewritten in place keeping its size and modification time.

use std::io::Write;
use std::net::TcpListener;
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
    #[arg(value_enum)]
    action: Action,
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
        .args(["--deliver-ms", &args.deliver_ms.to_string(), "serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
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
    // Up when its ports answer.
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
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{} did not come up", service_name(args.service));
    ExitCode::FAILURE
}

fn stop(args: &Args) -> ExitCode {
    if let Some(pid) = running_pid(args) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
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
    let name = args.name.clone();
    let result = match args.service {
        Service::Postfix => {
            banner(25, format!("220 {name} ESMTP BlueMind stand-in\r\n")).map(|_| {
                if args.deliver_ms > 0 {
                    deliver(&args.root, Duration::from_millis(args.deliver_ms));
                }
            })
        }
        Service::Bluemind => banner(
            143,
            format!("* OK [CAPABILITY IMAP4rev1] {name} BlueMind stand-in ready\r\n"),
        )
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
        .and_then(|_| api(&args.root, 8080)),
    };
    if let Err(e) = result {
        eprintln!("serve: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        std::thread::park();
    }
}

/// Mail keeps arriving while the service runs.
fn deliver(root: &Path, every: Duration) -> ! {
    let spool = root.join("var/spool/cyrus/data/user");
    let log_path = root.join("var/log/standin-delivered.log");
    let mut n = std::fs::read_to_string(&log_path)
        .map(|t| t.lines().count())
        .unwrap_or(0) as u64;
    loop {
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
            if let Ok(mut log) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
            {
                let _ = log.write_all(lines.as_bytes());
            }
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
        std::thread::sleep(every);
    }
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
