//! The world after a lab migration, seen from outside bmfleet: which host holds the service
//! IP, whom the switch maps it to, who answers on it, and the data on the host that serves —
//! compared with the origin's by content (every file's bytes, every table's rows, every
//! sequence), and checked against what the origin's writers recorded (the stand-in's delivery,
//! expunge and database ledgers). Nothing here asks bmfleet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::lab_fleet::{service_ip, LabFleet};

/// Databases a lab instance holds.
const DATABASES: [&str; 2] = ["bj", "bj-data"];

impl LabFleet {
    /// A connection from the orchestrator's host to pair `i`'s service IP's IMAP port, with
    /// the greeting read.
    fn greeted(&self, i: usize) -> Result<(std::net::TcpStream, String), String> {
        use std::io::Read;
        let address: std::net::SocketAddr = format!("{}:143", service_ip(i))
            .parse()
            .map_err(|e| format!("{e}"))?;
        self.lab.run_in("orch", || {
            let mut c = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
                .map_err(|e| format!("{address}: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            let n = c.read(&mut buf).map_err(|e| format!("{address}: {e}"))?;
            Ok((c, String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
    }

    /// What answers on pair `i`'s service IP's IMAP port, seen from the orchestrator's host
    /// (the stand-in's banner names its host); an error when nothing answers.
    pub fn banner(&self, i: usize) -> Result<String, String> {
        self.greeted(i).map(|(_, banner)| banner)
    }

    /// Which of pair `i`'s hosts answers on its service IP's IMAP port, seen from the
    /// orchestrator's host: the connection is held open while each host's kernel is asked
    /// whether it holds it (its TCP table, read inside its network namespace). Any server
    /// may answer: a real Cyrus's banner names no lab host.
    pub fn who_answers(&self, i: usize) -> Result<String, String> {
        let (conn, greeting) = self.greeted(i)?;
        let service = conn.peer_addr().map_err(|e| e.to_string())?;
        if !greeting.starts_with("* OK") {
            return Err(format!("{service} greeted {greeting:?}"));
        }
        let ours = conn.local_addr().map_err(|e| e.to_string())?;
        let holders: Vec<String> = [format!("origin-{i}"), format!("target-{i}")]
            .into_iter()
            .filter(|host| {
                // iproute2's ss inside the host's namespace (a thread that entered it would
                // still read its process's /proc/net).
                self.lab
                    .command(host, "ss")
                    .args([
                        "-Htn",
                        "state",
                        "all",
                        "src",
                        &service.to_string(),
                        "dst",
                        &ours.to_string(),
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
            })
            .collect();
        drop(conn);
        match holders.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!(
                "neither host of pair {i} holds the connection {ours} → {service}"
            )),
            both => Err(format!(
                "both {both:?} hold the connection {ours} → {service}"
            )),
        }
    }

    /// Waits (up to 15 s: announcements repeat over seconds) until the switch maps pair `i`'s
    /// service IP to `host`'s MAC.
    pub fn wait_for_neighbour(&self, i: usize, host: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mac = self.lab.mac(host);
        loop {
            let seen = self.lab.switch_neighbour(&service_ip(i));
            if seen.as_deref() == Some(mac.as_str()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the switch maps {} to {seen:?}, not {host}'s {mac}",
                    service_ip(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `host` has pair `i`'s service IP on its card.
    pub fn holds_service_ip(&self, host: &str, i: usize) -> bool {
        self.lab
            .ip(host, &["-brief", "address", "show", &self.lab.card(host)])
            .split_whitespace()
            .any(|a| a == format!("{}/24", service_ip(i)))
    }

    /// Every table of `host`'s BlueMind databases (`db.schema.table` → rows and the md5 of
    /// every row's text in a stable order) and every sequence (`db.seq:schema.name` → its
    /// last value).
    pub fn database_digest(&self, host: &str) -> BTreeMap<String, String> {
        let mut digest = BTreeMap::new();
        for db in DATABASES {
            let query = self.sql(
                host,
                db,
                "SELECT string_agg(format('SELECT %L || '' '' || count(*) || '' '' || \
                 md5(coalesce(string_agg(t::text, E''\\n'' ORDER BY t::text COLLATE \"C\"), '''')) \
                 FROM %I.%I t', schemaname || '.' || tablename, schemaname, tablename), \
                 ' UNION ALL ' ORDER BY schemaname, tablename) FROM pg_catalog.pg_tables \
                 WHERE schemaname NOT IN ('pg_catalog', 'information_schema');",
            );
            let query = query.trim();
            if !query.is_empty() {
                for line in self.sql(host, db, &format!("{query};")).lines() {
                    if let Some((table, rows)) = line.split_once(' ') {
                        digest.insert(format!("{db}.{table}"), rows.to_string());
                    }
                }
            }
            let sequences = self.sql(
                host,
                db,
                "SELECT schemaname || '.' || sequencename || ' ' || coalesce(last_value::text, 'unused') \
                 FROM pg_catalog.pg_sequences ORDER BY 1;",
            );
            for line in sequences.lines() {
                if let Some((name, value)) = line.split_once(' ') {
                    digest.insert(format!("{db}.seq:{name}"), value.to_string());
                }
            }
        }
        digest
    }

    /// Every entry of `host`'s seven BlueMind data dirs: a file's SHA-256, a symlink's
    /// target, "dir" for a directory.
    pub fn data_digest(&self, host: &str) -> BTreeMap<String, String> {
        let root = self.root(host);
        let mut digest = BTreeMap::new();
        for dir in bmfleet_proto::BLUEMIND_DATA_DIRS {
            let base = root.join(dir.trim_start_matches('/'));
            for entry in walkdir::WalkDir::new(&base).into_iter().flatten() {
                let rel = entry
                    .path()
                    .strip_prefix(&root)
                    .unwrap_or(entry.path())
                    .display()
                    .to_string();
                let kind = entry.file_type();
                let value = if kind.is_symlink() {
                    std::fs::read_link(entry.path())
                        .map(|t| format!("-> {}", t.display()))
                        .unwrap_or_else(|e| format!("unreadable link: {e}"))
                } else if kind.is_dir() {
                    "dir".into()
                } else {
                    match std::fs::read(entry.path()) {
                        Ok(bytes) => format!("{:x}", sha2::Sha256::digest(&bytes)),
                        Err(e) => format!("unreadable: {e}"),
                    }
                };
                digest.insert(rel, value);
            }
        }
        digest
    }

    /// The messages `origin`'s mail stand-in delivered and no client expunged since
    /// (paths under the data root), and the ones expunged.
    pub fn mail_ledger(&self, origin: &str) -> (Vec<String>, Vec<String>) {
        let read = |log: &str| -> Vec<String> {
            std::fs::read_to_string(self.root(origin).join("var/log").join(log))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        };
        let expunged = read("standin-expunged.log");
        let gone: std::collections::BTreeSet<&String> = expunged.iter().collect();
        let kept = read("standin-delivered.log")
            .into_iter()
            .filter(|m| !gone.contains(m))
            .collect();
        (kept, expunged)
    }

    /// The mailboxes `origin`'s BlueMind stand-in committed (its database ledger).
    pub fn rows_committed(&self, origin: &str) -> Vec<String> {
        std::fs::read_to_string(self.root(origin).join("var/log/standin-db.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The writers' rows `host` holds: which of `logins` are in its `t_mailbox`.
    fn committed_rows_missing(&self, host: &str, logins: &[String]) -> Vec<String> {
        let present: std::collections::BTreeSet<String> = self
            .sql(
                host,
                "bj",
                "SELECT login FROM t_mailbox WHERE login LIKE 'writer-%';",
            )
            .lines()
            .map(str::to_string)
            .collect();
        logins
            .iter()
            .filter(|l| !present.contains(*l))
            .cloned()
            .collect()
    }

    /// Who serves pair `i` as the world sees it: `host` alone holds the service IP, the
    /// switch maps it to `host`'s card, and `host` answers on it.
    fn check_serves(&self, i: usize, host: &str, other: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.holds_service_ip(host, i) {
            problems.push(format!("{host} does not hold {}", service_ip(i)));
        }
        if self.holds_service_ip(other, i) {
            problems.push(format!("{other} still holds {}", service_ip(i)));
        }
        if let Err(e) = self.wait_for_neighbour(i, host) {
            problems.push(e);
        }
        match self.who_answers(i) {
            Ok(h) if h == host => {}
            Ok(h) => problems.push(format!("{h} answers on {}, not {host}", service_ip(i))),
            Err(e) => problems.push(format!("who answers on {}: {e}", service_ip(i))),
        }
        problems
    }

    /// Pair `i` migrated, seen from outside: the target alone holds the service IP, the
    /// switch maps it to the target's card, the target answers; every file of the seven data
    /// dirs is on the target with the origin's bytes, every table's rows and every sequence
    /// equal; every message delivered and not expunged is there, none expunged is, and every
    /// row the origin's BlueMind committed is in the target's database.
    pub fn check_migrated(&self, i: usize) -> Result<(), String> {
        let (origin, target) = (format!("origin-{i}"), format!("target-{i}"));
        let mut problems = self.check_serves(i, &target, &origin);
        let (theirs, ours) = (self.database_digest(&origin), self.database_digest(&target));
        let differing: Vec<String> = theirs
            .keys()
            .chain(ours.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|k| !same_database_entry(k, theirs.get(*k), ours.get(*k)))
            .map(|k| format!("{k}: origin {:?}, target {:?}", theirs.get(k), ours.get(k)))
            .collect();
        if !differing.is_empty() {
            problems.push(format!("databases differ: {differing:?}"));
        }
        if !theirs.keys().any(|k| k.starts_with("bj.public.")) {
            problems.push(format!("{origin} has no BlueMind table: {theirs:?}"));
        }
        // A real Cyrus serving on the target rewrites its own state as it runs (recovery at
        // start, indexes as clients read) and its users' mailboxes keep taking mail and acts
        // after the cutover: those are checked through IMAP instead (check_mail) and by Cyrus
        // itself (chk_cyrus); the rest of the spool by content.
        let live_mailboxes: Vec<String> = crate::lab_fleet::MAIL_USERS
            .iter()
            .chain(&crate::lab_fleet::SERVICE_MAILBOXES)
            .map(|u| format!("var/spool/cyrus/data/user/{u}/"))
            .collect();
        let live = |digest: BTreeMap<String, String>| -> BTreeMap<String, String> {
            if !self.params.real_mail {
                return digest;
            }
            digest
                .into_iter()
                .filter(|(k, _)| {
                    !k.starts_with("var/lib/cyrus")
                        && !k.starts_with("var/spool/cyrus/data/uuid")
                        && !live_mailboxes.iter().any(|m| k.starts_with(m.as_str()))
                })
                .collect()
        };
        let (theirs, ours) = (
            live(self.data_digest(&origin)),
            live(self.data_digest(&target)),
        );
        let differing: Vec<&String> = theirs
            .keys()
            .chain(ours.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|k| theirs.get(*k) != ours.get(*k))
            .collect();
        if !differing.is_empty() {
            problems.push(format!(
                "{} of {} data entries differ (origin {}, target {}), first: {:?}",
                differing.len(),
                theirs.len(),
                theirs.len(),
                ours.len(),
                differing.iter().take(5).collect::<Vec<_>>()
            ));
        }
        self.check_writers(&origin, &target, &mut problems);
        finish(i, problems)
    }

    /// What `origin`'s writers recorded, as `host` holds it: every message delivered and not
    /// expunged there, no expunged one, every committed row.
    fn check_writers(&self, origin: &str, host: &str, problems: &mut Vec<String>) {
        let (kept, expunged) = self.mail_ledger(origin);
        let here = |m: &&String| self.root(host).join(m).exists();
        let missing: Vec<&String> = kept.iter().filter(|m| !here(m)).collect();
        if !missing.is_empty() {
            problems.push(format!("messages missing on {host}: {missing:?}"));
        }
        let back: Vec<&String> = expunged.iter().filter(here).collect();
        if !back.is_empty() {
            problems.push(format!("expunged messages back on {host}: {back:?}"));
        }
        let rows = self.rows_committed(origin);
        let missing = self.committed_rows_missing(host, &rows);
        if !missing.is_empty() {
            problems.push(format!(
                "{} of {} committed mailboxes missing on {host}: {:?}",
                missing.len(),
                rows.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            ));
        }
    }

    /// Pair `i` not migrated and intact, seen from outside: the origin alone holds the
    /// service IP, the switch maps it to the origin's card, the origin answers; every message
    /// it delivered and no client expunged is in its spool, and every row its BlueMind
    /// committed is in its database.
    pub fn check_origin_serves(&self, i: usize) -> Result<(), String> {
        let (origin, target) = (format!("origin-{i}"), format!("target-{i}"));
        let mut problems = self.check_serves(i, &origin, &target);
        self.check_writers(&origin, &origin, &mut problems);
        finish(i, problems)
    }
}

impl LabFleet {
    /// Every grant pair `i`'s origin registered for its target (from the origin agent's
    /// log), presented again on the origin's data plane by the target, with the target's
    /// own certificate: each must be refused as unknown or expired (within 10 s: the
    /// orchestrator withdraws an instance's grants right after its last transition). Returns
    /// how many were tried (none: the origin never granted anything to the target), or an
    /// error naming the grants still admitted.
    pub fn old_grants_refused(&self, i: usize) -> Result<usize, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_old_grants(i) {
                Err(e) if Instant::now() < deadline && e.contains("not refused") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn try_old_grants(&self, i: usize) -> Result<usize, String> {
        use bmfleet_agent::plane::tunnel::{self, TunnelError, TunnelRequest};
        let (origin, target) = (format!("origin-{i}"), format!("target-{i}"));
        let log = std::fs::read_to_string(self.dir().join(format!("{origin}.log")))
            .map_err(|e| format!("{origin}'s log: {e}"))?;
        let mut grants: Vec<String> = log
            .lines()
            .filter(|l| l.contains("grant registered") && l.contains(&format!("target={target}")))
            .filter_map(|l| {
                let at = l.find(" grant=")? + " grant=".len();
                l[at..].split_whitespace().next().map(str::to_string)
            })
            .collect();
        grants.sort();
        grants.dedup();
        if grants.is_empty() {
            return Ok(0);
        }
        let config =
            bmfleet_agent::config::AgentConfig::load(&self.dir().join(format!("{target}.toml")))
                .map_err(|e| e.to_string())?;
        let identity = bmfleet_proto::tls::LocalIdentity::load(
            &config.tls,
            bmfleet_proto::identity::Role::Agent,
        )
        .map_err(|e| e.to_string())?;
        let tls = identity
            .client_config(bmfleet_proto::identity::Role::Agent)
            .map_err(|e| e.to_string())?;
        let endpoint = bmfleet_proto::v1::OriginEndpoint {
            name: origin.clone(),
            address: format!("198.18.0.{}:7444", 2 * i),
            ..Default::default()
        };
        let admitted: Vec<String> = self.lab.run_in(&target, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(runtime.block_on(async {
                let mut admitted = Vec::new();
                for grant in &grants {
                    let request = TunnelRequest::WalPosition {
                        grant: grant.clone(),
                    };
                    match tunnel::open(&endpoint, tls.clone(), &request, Duration::from_secs(10))
                        .await
                    {
                        Err(TunnelError::Refused { reason, .. })
                            if reason.contains("no grant") || reason.contains("expired") => {}
                        other => admitted.push(format!("{grant}: {:?}", other.map(|_| "admitted"))),
                    }
                }
                admitted
            }))
        })?;
        if admitted.is_empty() {
            Ok(grants.len())
        } else {
            Err(format!(
                "pair {i}: old grants not refused as unknown or expired: {admitted:?}"
            ))
        }
    }
}

/// Whether the target's entry of the database digest matches the origin's: a table's rows
/// exactly; a sequence at the origin's value or ahead of it. A promoted physical standby's
/// sequences run up to 32 values ahead: PostgreSQL WAL-logs a sequence that many values in
/// advance (`SEQ_LOG_VALS`, src/backend/commands/sequence.c), and a standby replays the
/// logged value. Ahead never hands out an id twice; behind would.
fn same_database_entry(key: &str, origin: Option<&String>, target: Option<&String>) -> bool {
    match (origin, target) {
        (Some(o), Some(t)) if key.contains(".seq:") => match (o.parse::<i64>(), t.parse::<i64>()) {
            (Ok(o), Ok(t)) => t >= o && t - o <= 32,
            _ => o == t,
        },
        (o, t) => o == t,
    }
}

/// What the real mail stack of a pair shows after its migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailCount {
    /// Messages the sender's Postfix accepted for the instance.
    pub sent: usize,
    /// Of them, served exactly once by the host serving the IP (expunged ones not counted).
    pub delivered: usize,
    /// Expunged by a client (served nowhere, as they should be).
    pub expunged: usize,
    /// Served more than once.
    pub duplicated: usize,
    /// Served nowhere and never expunged.
    pub lost: usize,
    /// Messages whose last flag act (flag or unflag) the target serves as the client left it.
    pub flags_kept: usize,
    /// Messages with a flag act.
    pub flags_set: usize,
    /// Messages moved to Archive by a client.
    pub moved: usize,
    /// Acts whose answer never came (either outcome is right for them).
    pub unsure: usize,
}

impl MailCount {
    /// Adds another instance's counts.
    pub fn add(&mut self, other: &MailCount) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.expunged += other.expunged;
        self.duplicated += other.duplicated;
        self.lost += other.lost;
        self.flags_kept += other.flags_kept;
        self.flags_set += other.flags_set;
        self.moved += other.moved;
        self.unsure += other.unsure;
    }
}

/// One message as its clients left it.
#[derive(Debug, Clone)]
struct Wanted {
    user: String,
    folder: &'static str,
    flagged: Option<bool>,
    expunged: bool,
    unsure: bool,
}

impl LabFleet {
    /// Pair `i`'s mail as the internet sent it and its clients left it (the traffic's ledger:
    /// every message the sender's Postfix accepted, every flag, unflag, move and expunge Cyrus
    /// confirmed), against what the host serving the IP serves over IMAP now: every message
    /// sent and not expunged exactly once, in its folder, with its flags; no expunged one;
    /// nothing else; and Cyrus's own check of the serving host's spool finds nothing. Any
    /// difference is an error naming the first ones.
    pub fn check_mail(&self, i: usize) -> Result<MailCount, String> {
        let ledger = std::fs::read_to_string(crate::mail_traffic::ledger_path(self, i))
            .map_err(|e| format!("pair {i}: no mail ledger: {e}"))?;
        let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
        let mut count = MailCount::default();
        for line in ledger.lines() {
            let mut words = line.split_whitespace();
            let (Some(act), Some(id), Some(user)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if act == "deliver" {
                count.sent += 1;
                wanted.insert(
                    id.to_string(),
                    Wanted {
                        user: user.to_string(),
                        folder: "INBOX",
                        flagged: None,
                        expunged: false,
                        unsure: false,
                    },
                );
                continue;
            }
            let Some(w) = wanted.get_mut(id) else {
                continue;
            };
            match act {
                "flag" => w.flagged = Some(true),
                "unflag" => w.flagged = Some(false),
                "move" => {
                    count.moved += 1;
                    w.folder = "Archive";
                }
                "expunge" => w.expunged = true,
                _ => {
                    count.unsure += 1;
                    w.unsure = true;
                }
            }
        }
        let address: std::net::SocketAddr = format!("{}:143", service_ip(i))
            .parse()
            .map_err(|e| format!("{e}"))?;
        let mut problems = Vec::new();
        for user in crate::lab_fleet::MAIL_USERS {
            let served = self
                .lab
                .run_in("orch", || crate::mail::served(address, user))?;
            for (id, w) in wanted.iter().filter(|(_, w)| w.user == user) {
                let seen = served.get(id).cloned().unwrap_or_default();
                if w.flagged.is_some() && !w.expunged {
                    count.flags_set += 1;
                }
                match (w.expunged, w.unsure, seen.as_slice()) {
                    (true, _, []) => count.expunged += 1,
                    (true, false, _) => {
                        problems.push(format!("{user}: expunged {id} served again: {seen:?}"))
                    }
                    (_, true, [_]) => count.delivered += 1,
                    (_, true, []) => count.expunged += 1,
                    (false, false, [(folder, flags)]) => {
                        count.delivered += 1;
                        if folder != w.folder {
                            problems.push(format!("{user}: {id} in {folder}, not {}", w.folder));
                        }
                        let flagged = flags.iter().any(|x| x == "\\Flagged");
                        match w.flagged {
                            Some(f) if f == flagged => count.flags_kept += 1,
                            Some(f) => {
                                problems.push(format!("{user}: {id} flags {flags:?}, flagged: {f}"))
                            }
                            None if flagged => {
                                problems.push(format!("{user}: {id} flagged by nobody"))
                            }
                            None => {}
                        }
                    }
                    (false, false, []) => {
                        count.lost += 1;
                        problems.push(format!("{user}: {id} lost"));
                    }
                    (_, _, several) => {
                        count.duplicated += 1;
                        problems.push(format!(
                            "{user}: {id} served {} times: {several:?}",
                            several.len()
                        ));
                    }
                }
            }
            for id in served.keys() {
                if !wanted.contains_key(id) {
                    problems.push(format!("{user}: {id} served but never sent"));
                }
            }
        }
        // Cyrus's own check of the spool it serves from.
        let serving = match self.holds_service_ip(&format!("target-{i}"), i) {
            true => format!("target-{i}"),
            false => format!("origin-{i}"),
        };
        if let Err(e) = self.chk_cyrus(&serving) {
            problems.push(e);
        }
        if count.sent == 0 {
            Err(format!("pair {i}: no mail was sent"))
        } else if problems.is_empty() {
            Ok(count)
        } else {
            Err(format!(
                "pair {i}: {} problems ({count:?}): {}",
                problems.len(),
                problems
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        }
    }
}

/// A message in a Postfix queue, as `postqueue -j` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Queued {
    /// deferred, hold, active, incoming, maildrop.
    pub queue: String,
    /// Its recipients.
    pub recipients: Vec<String>,
}

impl LabFleet {
    /// Mail that must stay in pair `i`'s queue through the migration: submitted on the
    /// origin itself (as BlueMind's webmail submits), one message to a domain whose server
    /// is down (deferred) and one to the recipient Postfix holds.
    pub fn queue_mail_at_origin(&self, i: usize) -> Result<(), String> {
        let domain = crate::lab_fleet::mail_domain(i);
        self.lab.run_in(&format!("origin-{i}"), || {
            let mut smtp =
                crate::mail::Smtp::connect(([127, 0, 0, 1], 25).into(), Duration::from_secs(2))?;
            for to in [
                format!("bob@{}", crate::lab_fleet::UNREACHABLE_DOMAIN),
                format!("{}@{domain}", crate::lab_fleet::HELD_USER),
            ] {
                let message = format!(
                    "From: alice@{domain}\r\nTo: {to}\r\nMessage-ID: <queued-{i}-{to}>\r\nSubject: stays queued\r\n\r\nbody\r\n"
                );
                smtp.send(&format!("alice@{domain}"), &to, &message)?;
            }
            Ok(())
        })
    }

    /// What the running Postfix of `host` holds (`postqueue -j` in its mail namespace).
    pub fn postqueue(&self, host: &str) -> Result<Vec<Queued>, String> {
        let out = self
            .mail_exec(host, &["postqueue", "-j"])
            .map_err(|e| format!("postqueue on {host}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "postqueue -j on {host}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mut queued = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("postqueue -j: {e}: {line}"))?;
            queued.push(Queued {
                queue: v["queue_name"].as_str().unwrap_or_default().to_string(),
                recipients: v["recipients"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["address"].as_str().map(str::to_string))
                    .collect(),
            });
        }
        queued.sort();
        Ok(queued)
    }

    /// The mail that must stay queued for pair `i` ([`LabFleet::queue_mail_at_origin`]).
    pub fn must_stay_queued(&self, i: usize) -> Vec<Queued> {
        let mut queued = vec![
            Queued {
                queue: "deferred".into(),
                recipients: vec![format!("bob@{}", crate::lab_fleet::UNREACHABLE_DOMAIN)],
            },
            Queued {
                queue: "hold".into(),
                recipients: vec![format!(
                    "{}@{}",
                    crate::lab_fleet::HELD_USER,
                    crate::lab_fleet::mail_domain(i)
                )],
            },
        ];
        queued.sort();
        queued
    }

    /// Pair `i`'s queues after its migration (or rollback): the serving host's Postfix holds
    /// exactly the mail that must stay queued (after a migration carried from the origin:
    /// nothing stranded, nothing else left), the sender's Postfix has delivered everything for
    /// the pair (waits up to `within` for the relays), and the other host's Postfix stays
    /// stopped (the origin's copies never leave twice). Mail
    /// the origin's queue held at the stop and that was not to stay queued is checked where
    /// it must be: served once through IMAP ([`LabFleet::check_mail`]).
    pub fn check_queues(&self, i: usize, within: Duration) -> Result<(), String> {
        let (origin, target) = (format!("origin-{i}"), format!("target-{i}"));
        // Whoever serves holds the queue (the target after a migration, the origin after a
        // rollback); the other's Postfix stays stopped.
        let (serving, other) = if self.holds_service_ip(&target, i) {
            (target, origin)
        } else {
            (origin, target)
        };
        let wanted = self.must_stay_queued(i);
        let deadline = Instant::now() + within;
        // The sender stands for the internet's mail servers, which retry on their own
        // timers; one of the sender's messages left in its incoming queue (its queue
        // manager's wake-up lost, next scan in 300 s) is flushed once, with what the
        // sender's log said printed, rather than waited for.
        let mut nudge = Some(Instant::now() + within / 4);
        loop {
            let (on_target, on_sender) = (self.postqueue(&serving)?, self.postqueue(SENDER_HOST)?);
            let for_pair: Vec<&Queued> = on_sender
                .iter()
                .filter(|q| {
                    q.recipients
                        .iter()
                        .any(|r| r.ends_with(&format!("@{}", crate::lab_fleet::mail_domain(i))))
                })
                .collect();
            if on_target == wanted && for_pair.is_empty() {
                break;
            }
            if nudge.is_some_and(|at| Instant::now() > at)
                && for_pair.iter().all(|q| q.queue == "incoming")
                && !for_pair.is_empty()
            {
                nudge = None;
                eprintln!(
                    "pair {i}: the sender's incoming queue still holds {for_pair:?}; flushing it. Its log's tail:\n{}",
                    self.sender_log_tail(40)
                );
                self.mail_exec(SENDER_HOST, &["postqueue", "-f"])
                    .map_err(|e| format!("postqueue -f on the sender: {e}"))?;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pair {i}: {serving}'s queue holds {on_target:?} (wanted {wanted:?}); the sender still holds {for_pair:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // The other host's Postfix stays stopped: what it still holds (the origin's copies,
        // kept for a rollback) never leaves a second time.
        if self.service(&other, "postfix", "status").status.success() {
            return Err(format!(
                "pair {i}: {other}'s Postfix runs, and {serving} serves"
            ));
        }
        Ok(())
    }
}

impl LabFleet {
    /// The last `lines` lines of the sender's Postfix log.
    fn sender_log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.root(SENDER_HOST).join("var/log/postfix/mail.log"))
            .unwrap_or_else(|e| format!("(the sender's mail.log: {e})"));
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `command` in `host`'s mail namespace (its root's BlueMind mail paths), in the
    /// host's network namespace.
    fn mail_exec(&self, host: &str, command: &[&str]) -> std::io::Result<std::process::Output> {
        let argv = crate::lab_fleet::mail_exec_argv(&self.root(host), host, command);
        self.lab.command(host, &argv[0]).args(&argv[1..]).output()
    }

    /// Cyrus's own consistency check on `host` (chk_cyrus over the default partition, run as
    /// `cyrus` in the host's mail namespace): Ok when it exits 0 and reports no error and
    /// nothing missing.
    pub fn chk_cyrus(&self, host: &str) -> Result<(), String> {
        let out = self
            .mail_exec(
                host,
                &[
                    "runuser",
                    "-u",
                    "cyrus",
                    "--",
                    "/usr/lib/cyrus/bin/chk_cyrus",
                    "-P",
                    "default",
                ],
            )
            .map_err(|e| format!("chk_cyrus: {e}"))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            Err(format!("chk_cyrus on {host} exited {}: {said}", out.status))
        } else if said.to_lowercase().contains("error") || said.contains("missing") {
            Err(format!("chk_cyrus on {host}: {said}"))
        } else {
            Ok(())
        }
    }
}

/// The sender host's name.
const SENDER_HOST: &str = crate::lab_fleet::SENDER;

fn finish(i: usize, problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("pair {i}: {}", problems.join("; ")))
    }
}
