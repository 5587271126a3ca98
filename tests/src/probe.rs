//! The mail client's view of a downtime, measured from outside: from the orchestrator's host,
//! every 100 ms each pair's service IP is asked for an IMAP session (a login on a real Cyrus,
//! the greeting on the stand-in); a pair's client-seen downtime runs from its first failed
//! probe to the first success after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::lab_fleet::{service_ip, LabFleet};

/// One pair's probes: when the service first failed, and every outage so far.
#[derive(Debug, Clone, Default)]
struct Outage {
    down_since: Option<Instant>,
    longest: Option<Duration>,
    all: Vec<(Duration, Duration)>,
}

/// What a pair's mail client saw.
#[derive(Debug, Clone, Default)]
pub struct ClientView {
    /// Its longest outage (None: never down).
    pub downtime: Option<Duration>,
    /// Whether the last probe got in.
    pub up_at_end: bool,
    /// Every outage: when it began (since the probes started) and how long it lasted.
    pub outages: Vec<(Duration, Duration)>,
}

/// Probes every pair's service IP from the orchestrator's host until `stop`; returns what
/// each pair's client saw.
pub fn client_downtimes(fleet: &LabFleet, stop: &AtomicBool) -> Vec<ClientView> {
    let pairs = fleet.params.pairs;
    let login = fleet.params.real_mail;
    fleet.lab.run_in("orch", || {
        let started = Instant::now();
        let mut outages = vec![Outage::default(); pairs];
        while !stop.load(Ordering::SeqCst) {
            let round = Instant::now();
            for (k, outage) in outages.iter_mut().enumerate() {
                let up = answers(&service_ip(k + 1), login);
                match (up, outage.down_since) {
                    (false, None) => outage.down_since = Some(Instant::now()),
                    (true, Some(since)) => {
                        let lasted = since.elapsed();
                        outage.longest = Some(outage.longest.map_or(lasted, |l| l.max(lasted)));
                        outage.all.push((since - started, lasted));
                        outage.down_since = None;
                    }
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(100).saturating_sub(round.elapsed()));
        }
        outages
            .into_iter()
            .map(|o| ClientView {
                // Still down at the end: as long as it lasted so far.
                downtime: match (o.longest, o.down_since) {
                    (longest, Some(since)) => {
                        Some(longest.map_or(since.elapsed(), |l| l.max(since.elapsed())))
                    }
                    (longest, None) => longest,
                },
                up_at_end: o.down_since.is_none(),
                outages: o.all,
            })
            .collect()
    })
}

/// Whether an IMAP session opens on `ip` within half a second (and, with `login`, a user
/// logs in).
fn answers(ip: &str, login: bool) -> bool {
    let Ok(address) = format!("{ip}:143").parse::<std::net::SocketAddr>() else {
        return false;
    };
    if login {
        return crate::mail::Imap::login_within(
            address,
            "alice",
            "lab",
            Duration::from_millis(500),
        )
        .is_ok();
    }
    use std::io::Read;
    let Ok(mut c) = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500))
    else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    matches!(c.read(&mut buf), Ok(n) if buf[..n].starts_with(b"* OK"))
}
