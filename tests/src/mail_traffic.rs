//! The internet and the mail clients beside the lab fleet (the real mail stack): from the
//! sender host, a generator submits messages at a steady rate to the sender's Postfix, each
//! with a unique Message-ID, for every instance's users (the sender's Postfix relays them to
//! the service IPs, retrying within seconds what a window deferred); mail clients log in on
//! each service IP over IMAP and flag, unflag, move and expunge what arrived, as Cyrus's
//! index rewrites in place demand of the passes. Each instance's ledger
//! (`mail-ledger-I.log` in the lab's dir) lists what the sender accepted and every act Cyrus
//! confirmed: `deliver ID USER`, `flag`, `unflag`, `move`, `expunge`, and `unsure ID USER`
//! for an act whose answer never came (its outcome unknown to the client too).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::append;
use crate::lab_fleet::{mail_domain, service_ip, LabFleet, MAIL_USERS, SENDER};
use crate::mail::{Imap, Smtp};

/// What the generator and the clients did.
#[derive(Debug, Clone, Default)]
pub struct TrafficReport {
    /// Messages the sender's Postfix accepted, per instance.
    pub sent: Vec<usize>,
    /// Submissions the sender's Postfix refused or that failed (not in any ledger).
    pub refused: usize,
    /// Client acts confirmed by Cyrus, per instance.
    pub acts: Vec<usize>,
}

/// One instance's ledger file.
pub fn ledger_path(fleet: &LabFleet, i: usize) -> PathBuf {
    fleet.dir().join(format!("mail-ledger-{i}.log"))
}

/// A message the sender accepted: its Message-ID, user and when.
#[derive(Clone)]
struct Sent {
    id: String,
    user: &'static str,
    at: Instant,
}

/// What a client does to the n-th message of an instance (once it arrived): flags it, moves
/// it to Archive, expunges it, flags and unflags it, or leaves it.
fn act_for(n: usize) -> &'static [&'static str] {
    match n % 5 {
        0 => &["flag"],
        1 => &["move"],
        2 => &["expunge"],
        3 => &["flag", "unflag"],
        _ => &[],
    }
}

/// Runs the generator (a message every `every`, instances in turn) and the clients from the
/// sender host until `stop`.
pub fn run(fleet: &LabFleet, every: Duration, stop: &AtomicBool) -> TrafficReport {
    let pairs = fleet.params.pairs;
    let ledgers: Vec<PathBuf> = (1..=pairs).map(|i| ledger_path(fleet, i)).collect();
    let sent: Vec<Mutex<Vec<Sent>>> = (0..pairs).map(|_| Mutex::new(Vec::new())).collect();
    let generator_done = AtomicBool::new(false);
    fleet.lab.run_in(SENDER, || {
        std::thread::scope(|scope| {
            // Threads made here are in the sender's network namespace too.
            let generator = scope.spawn(|| {
                let refused = generate(pairs, every, stop, &ledgers, &sent);
                generator_done.store(true, Ordering::SeqCst);
                refused
            });
            let clients = scope.spawn(|| act(pairs, &generator_done, &ledgers, &sent));
            let refused = generator.join().unwrap_or_default();
            let acts = clients.join().unwrap_or_default();
            TrafficReport {
                sent: sent
                    .iter()
                    .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
                    .collect(),
                refused,
                acts,
            }
        })
    })
}

fn generate(
    pairs: usize,
    every: Duration,
    stop: &AtomicBool,
    ledgers: &[PathBuf],
    sent: &[Mutex<Vec<Sent>>],
) -> usize {
    let relay: std::net::SocketAddr = ([127, 0, 0, 1], 25).into();
    let mut session: Option<Smtp> = None;
    let (mut n, mut refused) = (0usize, 0usize);
    let tag = std::process::id();
    while !stop.load(Ordering::SeqCst) {
        let round = Instant::now();
        let k = n % pairs;
        let user = MAIL_USERS[(n / pairs) % MAIL_USERS.len()];
        let id = format!("<{n}.{tag}@sender.lab.example>");
        let to = format!("{user}@{}", mail_domain(k + 1));
        let message = format!(
            "From: generator@sender.lab.example\r\nTo: {to}\r\nMessage-ID: {id}\r\nSubject: message {n}\r\n\r\nbody of message {n}\r\n"
        );
        let result = match session.as_mut() {
            Some(s) => s.send("generator@sender.lab.example", &to, &message),
            None => Smtp::connect(relay, Duration::from_secs(2)).and_then(|mut s| {
                let r = s.send("generator@sender.lab.example", &to, &message);
                session = Some(s);
                r
            }),
        };
        match result {
            Ok(()) => {
                append(&ledgers[k], &format!("deliver {id} {user}\n"));
                if let Ok(mut list) = sent[k].lock() {
                    list.push(Sent {
                        id,
                        user,
                        at: Instant::now(),
                    });
                }
            }
            Err(e) => {
                eprintln!("generator: message {n}: {e}");
                refused += 1;
                session = None;
            }
        }
        n += 1;
        std::thread::sleep(every.saturating_sub(round.elapsed()));
    }
    refused
}

/// The clients: each instance's arrived messages acted on in order, through its service IP;
/// a message not there yet (deferred by a window) or a service that does not answer is
/// tried again later. Ends once the generator did and every message had its act (or a
/// minute passed since it was sent).
fn act(
    pairs: usize,
    generator_done: &AtomicBool,
    ledgers: &[PathBuf],
    sent: &[Mutex<Vec<Sent>>],
) -> Vec<usize> {
    let mut next = vec![0usize; pairs];
    let mut acts = vec![0usize; pairs];
    loop {
        let mut idle = true;
        for k in 0..pairs {
            let message = sent[k]
                .lock()
                .ok()
                .and_then(|list| list.get(next[k]).cloned());
            let Some(message) = message else { continue };
            idle = false;
            // Give the relay a moment; give up on a message after a minute (the check finds it).
            if message.at.elapsed() < Duration::from_millis(1500) {
                continue;
            }
            if message.at.elapsed() > Duration::from_secs(60) {
                next[k] += 1;
                continue;
            }
            let steps = act_for(next[k]);
            if steps.is_empty() {
                next[k] += 1;
                continue;
            }
            match act_on(k + 1, &message, steps, &ledgers[k]) {
                Ok(true) => {
                    acts[k] += steps.len();
                    next[k] += 1;
                }
                Ok(false) => {}
                Err(unsure) => {
                    eprintln!("client of pair {}: {unsure}", k + 1);
                    append(
                        &ledgers[k],
                        &format!("unsure {} {}\n", message.id, message.user),
                    );
                    next[k] += 1;
                }
            }
        }
        if idle && generator_done.load(Ordering::SeqCst) {
            return acts;
        }
        std::thread::sleep(Duration::from_millis(if idle { 200 } else { 50 }));
    }
}

/// One client session on pair `i`'s service IP doing `steps` to `message`: Ok(true) done
/// (each step logged), Ok(false) not possible now (service down, message not arrived), Err
/// when a step was sent and its answer never came.
fn act_on(
    i: usize,
    message: &Sent,
    steps: &[&str],
    ledger: &std::path::Path,
) -> Result<bool, String> {
    let Ok(address) = format!("{}:143", service_ip(i)).parse::<std::net::SocketAddr>() else {
        return Ok(false);
    };
    let Ok(mut session) = Imap::login_within(address, message.user, "lab", Duration::from_secs(1))
    else {
        return Ok(false);
    };
    if session.command("SELECT INBOX").is_err() {
        return Ok(false);
    }
    let Ok(Some(uid)) = session.uid_of(&message.id) else {
        return Ok(false);
    };
    for step in steps {
        let done = match *step {
            "flag" => session.command(&format!("UID STORE {uid} +FLAGS (\\Flagged)")),
            "unflag" => session.command(&format!("UID STORE {uid} -FLAGS (\\Flagged)")),
            "move" => {
                // Made at the first move (afterwards the refusal is fine).
                let _ = session.command("CREATE Archive");
                session.command(&format!("UID MOVE {uid} Archive"))
            }
            _ => session
                .command(&format!("UID STORE {uid} +FLAGS (\\Deleted)"))
                .and_then(|_| session.command("EXPUNGE")),
        };
        done.map_err(|e| format!("{step} of {}: {e}", message.id))?;
        append(ledger, &format!("{step} {} {}\n", message.id, message.user));
    }
    Ok(true)
}

/// A migration watched from outside: what bmctl reported, what the mail clients' probes
/// saw, and (with the real mail stack) what the traffic did.
pub struct Watched {
    /// Every instance's outcome, or why the migration did not finish.
    pub outcomes: Result<Vec<crate::lab_fleet::InstanceOutcome>, String>,
    /// What each pair's probing client saw.
    pub seen: Vec<crate::probe::ClientView>,
    /// The generator's and clients' work (empty without the real mail stack).
    pub traffic: TrafficReport,
}

/// Migrates the fleet (`LabFleet::migrate`) while a mail client probes every service IP and,
/// with the real mail stack, the internet sends mail (from a few seconds before `apply` until
/// `after` past the end) and the clients act on it.
pub fn migrate_watched(
    fleet: &LabFleet,
    timeout: Duration,
    after: Duration,
    on_table: impl FnMut(&str),
) -> Watched {
    let (stop_probes, stop_mail) = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|scope| {
        let probes = scope.spawn(|| crate::probe::client_downtimes(fleet, &stop_probes));
        let traffic = fleet.params.real_mail.then(|| {
            let traffic = scope.spawn(|| run(fleet, Duration::from_millis(100), &stop_mail));
            // Mail flows before the migration begins.
            std::thread::sleep(Duration::from_secs(3));
            traffic
        });
        let outcomes = fleet.migrate(timeout, on_table);
        if traffic.is_some() {
            std::thread::sleep(after);
        }
        stop_mail.store(true, Ordering::SeqCst);
        let traffic = traffic
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        stop_probes.store(true, Ordering::SeqCst);
        Watched {
            outcomes,
            seen: probes.join().unwrap_or_default(),
            traffic,
        }
    })
}
