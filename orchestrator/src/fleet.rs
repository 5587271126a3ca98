//! The fleet file (TOML): the fleet's policy and its instances. Every refusal names the file,
//! the line and the field.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::windows::Window;

/// A fleet file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {field}{sep}{message}", sep = if field.is_empty() { "" } else { ": " })]
pub struct FleetFileError {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The field, as a TOML path (empty when the parser could not tell).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    fleet: RawPolicy,
    #[serde(default)]
    instance: Vec<RawInstance>,
}

fn d_parallel() -> u32 {
    10
}
fn d_files() -> u64 {
    5_000
}
fn d_mib() -> u64 {
    200
}
fn d_passes() -> u32 {
    8
}
fn d_downtime() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}
fn d_stagger() -> u64 {
    120
}
fn d_canary() -> u32 {
    1
}
fn d_true() -> bool {
    true
}
fn d_failures() -> u32 {
    3
}
fn d_budget() -> u64 {
    900
}
fn d_round_secs() -> u64 {
    2
}
fn d_rounds() -> Spanned<u32> {
    Spanned::new(0..0, 4)
}
fn d_profile() -> Spanned<String> {
    Spanned::new(0..0, "auto".into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    #[serde(default = "d_parallel")]
    max_parallel_hot_syncs: u32,
    #[serde(default)]
    bandwidth_budget_mib: u32,
    #[serde(default = "d_files")]
    converge_max_files: u64,
    #[serde(default = "d_mib")]
    converge_max_mib: u64,
    #[serde(default = "d_passes")]
    max_passes: u32,
    #[serde(default = "d_downtime")]
    max_concurrent_downtime: Spanned<u32>,
    #[serde(default = "d_stagger")]
    min_stagger_secs: u64,
    #[serde(default = "d_canary")]
    canary_count: u32,
    #[serde(default = "d_true")]
    canary_approval: bool,
    #[serde(default = "d_failures")]
    failure_budget: u32,
    #[serde(default = "d_budget")]
    downtime_budget_secs: u64,
    #[serde(default)]
    windows: Vec<Spanned<RawWindow>>,
    #[serde(default)]
    rates: Rates,
    #[serde(default = "d_true")]
    final_pass_journal: bool,
    #[serde(default = "d_round_secs")]
    pre_window_round_secs: u64,
    #[serde(default = "d_rounds")]
    pre_window_rounds: Spanned<u32>,
    #[serde(default)]
    db_sync: Option<Spanned<String>>,
    #[serde(default)]
    notify: Vec<Spanned<String>>,
    #[serde(default = "d_notify_hours")]
    notify_hours_before: u64,
    #[serde(default)]
    gate: Option<Spanned<String>>,
}

fn d_notify_hours() -> u64 {
    24
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Vec<String>,
    start: String,
    end: String,
    timezone: String,
}

/// Rates used to project downtime when nothing was measured yet.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rates {
    /// Entries rsync walks per second in the final pass (its scan).
    pub scan_files_per_sec: f64,
    /// Changed data moved per second, MiB.
    pub transfer_mib_per_sec: f64,
    /// Database restored per second, MiB.
    pub restore_mib_per_sec: f64,
    /// Database compared per second, MiB (both sides' table checksums), when the target's
    /// databases follow the origin: the downtime holds the comparison, not a restore.
    pub checksum_mib_per_sec: f64,
    /// Seconds to stop BlueMind on the origin and start it on the target (with the IP move).
    pub services_secs: f64,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            scan_files_per_sec: 60_000.0,
            transfer_mib_per_sec: 100.0,
            restore_mib_per_sec: 25.0,
            checksum_mib_per_sec: 100.0,
            services_secs: 60.0,
        }
    }
}

/// What an instance is expected to hold, for plans made before any measurement.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Estimate {
    /// Entries in the data dirs.
    pub files: u64,
    /// Data changed between the last hot pass and the cold pass, MiB.
    pub changed_mib: f64,
    /// Size of the databases, MiB.
    pub database_mib: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Spanned<String>,
    origin: Spanned<String>,
    target: Spanned<String>,
    service_ip: Spanned<String>,
    interface: Option<Spanned<String>>,
    origin_interface: Option<Spanned<String>>,
    target_interface: Option<Spanned<String>>,
    #[serde(default = "d_profile")]
    bluemind: Spanned<String>,
    #[serde(default)]
    windows: Option<Vec<Spanned<RawWindow>>>,
    #[serde(default)]
    downtime_budget_secs: Option<u64>,
    #[serde(default)]
    mynetworks: Option<String>,
    #[serde(default)]
    extra_dirs: Vec<Spanned<String>>,
    #[serde(default)]
    db_sync: Option<Spanned<String>>,
    #[serde(default)]
    estimate: Estimate,
    #[serde(default)]
    notify: Vec<Spanned<String>>,
    #[serde(default)]
    contact: Option<toml::Table>,
    #[serde(default)]
    gate: Option<Spanned<String>>,
}

/// A receiver named in the fleet file, with the line that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedAt {
    /// The receiver's name (the orchestrator's `[[notify]]`).
    pub name: String,
    /// Where the file names it.
    pub line: usize,
    /// The field naming it.
    pub field: String,
}

/// How an instance's databases reach its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DbSync {
    /// A physical standby when both hosts allow it (same PostgreSQL major, same C library,
    /// the target configured for it, the origin's `wal_level` at least `replica`), else
    /// logical replication when the origin's `wal_level` is already `logical` and the
    /// target's major is the same or newer, else dump and restore; decided at preflight,
    /// never midway.
    #[default]
    Auto,
    /// A physical standby, or the preflight fails saying why not.
    Stream,
    /// Logical replication (a publication and a subscription per database; different
    /// PostgreSQL majors), or the preflight fails saying why not. Needs `wal_level = logical`
    /// on the origin, which only a restart of its PostgreSQL sets: the operator's to do.
    Logical,
    /// Dump and restore in the downtime.
    Dump,
}

impl DbSync {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(DbSync::Auto),
            "stream" => Ok(DbSync::Stream),
            "dump" => Ok(DbSync::Dump),
            "logical" => Ok(DbSync::Logical),
            other => Err(format!(
                "unknown db_sync '{other}': use auto, stream, logical or dump"
            )),
        }
    }

    /// The name used in the fleet file.
    pub fn as_str(self) -> &'static str {
        match self {
            DbSync::Auto => "auto",
            DbSync::Stream => "stream",
            DbSync::Logical => "logical",
            DbSync::Dump => "dump",
        }
    }
}

/// The BlueMind version family of an instance: it decides the databases and API paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// 3.5: one database, the old firewall path.
    V3_5,
    /// 4.x: bj and bj-data.
    V4,
    /// 5.x: bj and bj-data, password in bm.ini from 5.2, firewall on bm-core.
    V5,
    /// Read from the hosts at preflight.
    Auto,
}

/// The fleet's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Name of this migration (in operation ids and grants).
    pub name: String,
    /// Hot syncs running at once.
    pub max_parallel_hot_syncs: u32,
    /// Total bandwidth for hot syncs, MiB/s (0: no limit).
    pub bandwidth_budget_mib: u32,
    /// A pass changing at most this many files…
    pub converge_max_files: u64,
    /// …and at most this many MiB means the instance converged.
    pub converge_max_mib: u64,
    /// Passes before an instance is flagged "not converging".
    pub max_passes: u32,
    /// Instances down at once.
    pub max_concurrent_downtime: u32,
    /// Minimum seconds between two cold-sync starts.
    pub min_stagger_secs: u64,
    /// Instances migrated first, alone.
    pub canary_count: u32,
    /// Wait for `bmctl fleet approve` after the canaries.
    pub canary_approval: bool,
    /// Failed instances after which no new cold sync starts.
    pub failure_budget: u32,
    /// Default downtime budget, seconds.
    pub downtime_budget_secs: u64,
    /// Default maintenance windows (shared by every instance that has none of its own: the
    /// scheduler recognizes a list by its address, not by comparing time zones).
    pub windows: std::sync::Arc<Vec<Window>>,
    /// Default rates for projections.
    pub rates: Rates,
    /// The final pass moves only what the origin's change journal recorded since the
    /// pre-window pass (when the journal can prove it is complete); false: it walks everything.
    pub final_pass_journal: bool,
    /// A pre-window round that took longer than this (seconds) is followed by another (0:
    /// every round is, up to `pre_window_rounds`).
    pub pre_window_round_secs: u64,
    /// Rounds of a pre-window pass at most (1: a single pass).
    pub pre_window_rounds: u32,
    /// How databases reach their targets (instances may say otherwise).
    pub db_sync: DbSync,
    /// Receivers told about every instance (and about the fleet: its failure budget spent,
    /// the approval it awaits).
    pub notify: Vec<NamedAt>,
    /// A window is announced this many hours before it opens.
    pub notify_hours_before: u64,
    /// The receiver asked before each instance's downtime begins (its refusal holds the
    /// instance); none: windows open without asking.
    pub gate: Option<NamedAt>,
}

/// One instance to migrate.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// Unique name.
    pub name: String,
    /// Origin agent name.
    pub origin: String,
    /// Target agent name.
    pub target: String,
    /// The service IP and its prefix length.
    pub service_ip: IpAddr,
    /// Prefix length of the service IP.
    pub prefix: u8,
    /// The origin's card carrying the service IP (None: the one that holds it).
    pub origin_interface: Option<String>,
    /// The target's card for the service IP (None: the one with an address of the target's
    /// own in the service IP's subnet). Cards are named per host: `eth0` on the old
    /// distribution, `ens18` on the new one.
    pub target_interface: Option<String>,
    /// BlueMind version family.
    pub profile: Profile,
    /// Maintenance windows (the fleet's unless overridden).
    pub windows: std::sync::Arc<Vec<Window>>,
    /// Downtime budget, seconds.
    pub downtime_budget_secs: u64,
    /// mynetworks value to set; None: replace the origin's address with the target's.
    pub mynetworks: Option<String>,
    /// Data dirs synced besides BlueMind's own.
    pub extra_dirs: Vec<String>,
    /// How its databases reach the target.
    pub db_sync: DbSync,
    /// Migrated again on an operator's `--remigrate`: its preflight proves the direction and
    /// clears the target's served marker. Never set by the file itself.
    pub remigrate: bool,
    /// Expected sizes, for plans.
    pub estimate: Estimate,
    /// Receivers told about this instance besides the fleet's.
    pub notify: Vec<NamedAt>,
    /// The customer's contact fields, passed to receivers untouched.
    pub contact: Option<serde_json::Value>,
    /// The window gate asked before its downtime (the fleet's unless it names its own).
    pub gate: Option<NamedAt>,
}

/// A checked fleet file.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetFile {
    /// The policy.
    pub policy: Policy,
    /// The instances, in file order (canaries are the first ones).
    pub instances: Vec<InstanceSpec>,
}

/// Where a text's lines start: the line of any offset in a binary search (a fleet of 10,000
/// instances names one per field it checks).
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Self {
        Lines(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }
}

impl FleetFile {
    /// Reads and checks a fleet file.
    pub fn load(path: &Path) -> Result<Self, FleetFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FleetFileError {
            file: path.display().to_string(),
            line: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks fleet file text; `file` is used in messages.
    pub fn parse(text: &str, file: &str) -> Result<Self, FleetFileError> {
        let lines = Lines::of(text);
        let err = |span: std::ops::Range<usize>, field: String, message: String| FleetFileError {
            file: file.to_string(),
            line: lines.line(span.start),
            field,
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            err(
                e.span().unwrap_or(0..0),
                String::new(),
                e.message().trim().to_string(),
            )
        })?;
        let p = raw.fleet;
        if p.name.get_ref().is_empty()
            || !p
                .name
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(
                p.name.span(),
                "fleet.name".into(),
                "use letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if *p.max_concurrent_downtime.get_ref() == 0 {
            return Err(err(
                p.max_concurrent_downtime.span(),
                "fleet.max_concurrent_downtime".into(),
                "must be at least 1, or no instance could ever be migrated".into(),
            ));
        }
        if !(1..=10).contains(p.pre_window_rounds.get_ref()) {
            return Err(err(
                p.pre_window_rounds.span(),
                "fleet.pre_window_rounds".into(),
                "must be from 1 (a single pass) to 10".into(),
            ));
        }
        let parse_windows =
            |raw: &[Spanned<RawWindow>], field: &str| -> Result<Vec<Window>, FleetFileError> {
                raw.iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let r = w.get_ref();
                        Window::parse(&r.days, &r.start, &r.end, &r.timezone)
                            .map_err(|e| err(w.span(), format!("{field}[{i}]"), e.to_string()))
                    })
                    .collect()
            };
        let policy = Policy {
            name: p.name.into_inner(),
            max_parallel_hot_syncs: p.max_parallel_hot_syncs.max(1),
            bandwidth_budget_mib: p.bandwidth_budget_mib,
            converge_max_files: p.converge_max_files,
            converge_max_mib: p.converge_max_mib,
            max_passes: p.max_passes.max(1),
            max_concurrent_downtime: p.max_concurrent_downtime.into_inner(),
            min_stagger_secs: p.min_stagger_secs,
            canary_count: p.canary_count,
            canary_approval: p.canary_approval,
            failure_budget: p.failure_budget,
            downtime_budget_secs: p.downtime_budget_secs,
            final_pass_journal: p.final_pass_journal,
            pre_window_round_secs: p.pre_window_round_secs,
            pre_window_rounds: *p.pre_window_rounds.get_ref(),
            db_sync: match &p.db_sync {
                Some(d) => DbSync::parse(d.get_ref())
                    .map_err(|m| err(d.span(), "fleet.db_sync".into(), m))?,
                None => DbSync::Auto,
            },
            windows: std::sync::Arc::new(parse_windows(&p.windows, "fleet.windows")?),
            rates: p.rates,
            notify: named(&lines, &p.notify, "fleet.notify"),
            notify_hours_before: p.notify_hours_before,
            gate: p.gate.as_ref().map(|g| NamedAt {
                name: g.get_ref().clone(),
                line: lines.line(g.span().start),
                field: "fleet.gate".into(),
            }),
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut agents: HashMap<String, (String, usize)> = HashMap::new();
        let mut ips: HashMap<IpAddr, (String, usize)> = HashMap::new();
        let mut instances = Vec::new();
        for (i, r) in raw.instance.into_iter().enumerate() {
            let field = |f: &str| format!("instance[{i}].{f}");
            let name = r.name.get_ref().clone();
            bmfleet_proto::identity::validate_name(&name)
                .map_err(|m| err(r.name.span(), field("name"), m))?;
            // Where each was first seen, as an offset: its line is looked up only for an error.
            if let Some(at) = names.insert(name.clone(), r.name.span().start) {
                return Err(err(
                    r.name.span(),
                    field("name"),
                    format!(
                        "'{name}' is already the name of the instance at line {}",
                        lines.line(at)
                    ),
                ));
            }
            if r.origin.get_ref() == r.target.get_ref() {
                return Err(err(
                    r.target.span(),
                    field("target"),
                    "origin and target must be different agents".into(),
                ));
            }
            for (what, agent) in [("origin", &r.origin), ("target", &r.target)] {
                let a = agent.get_ref().clone();
                bmfleet_proto::identity::validate_name(&a)
                    .map_err(|m| err(agent.span(), field(what), m))?;
                if let Some((other, at)) =
                    agents.insert(a.clone(), (name.clone(), agent.span().start))
                {
                    return Err(err(
                        agent.span(),
                        field(what),
                        format!(
                            "agent '{a}' is already used by instance '{other}' (line {}): an agent serves one instance",
                            lines.line(at)
                        ),
                    ));
                }
            }
            // `interface` names both sides' card; `origin_interface` / `target_interface`
            // one side's (and win over it); none: each agent finds its own.
            let card = |side: &Option<Spanned<String>>, name: &str| match side
                .as_ref()
                .or(r.interface.as_ref())
            {
                Some(i) => {
                    let which = if side.is_some() { name } else { "interface" };
                    validate_interface(i.get_ref()).map_err(|m| err(i.span(), field(which), m))?;
                    Ok(Some(i.get_ref().clone()))
                }
                None => Ok(None),
            };
            let origin_interface = card(&r.origin_interface, "origin_interface")?;
            let target_interface = card(&r.target_interface, "target_interface")?;
            let (ip, prefix) = parse_cidr(r.service_ip.get_ref())
                .map_err(|m| err(r.service_ip.span(), field("service_ip"), m))?;
            if let Some((other, at)) = ips.insert(ip, (name.clone(), r.service_ip.span().start)) {
                return Err(err(
                    r.service_ip.span(),
                    field("service_ip"),
                    format!(
                        "{ip} is already the service IP of instance '{other}' (line {})",
                        lines.line(at)
                    ),
                ));
            }
            let profile = match r.bluemind.get_ref().as_str() {
                "3.5" => Profile::V3_5,
                "4.x" | "4" => Profile::V4,
                "5.x" | "5" => Profile::V5,
                "auto" => Profile::Auto,
                other => {
                    return Err(err(
                        r.bluemind.span(),
                        field("bluemind"),
                        format!("unknown profile '{other}': use 3.5, 4.x, 5.x or auto"),
                    ))
                }
            };
            let windows = match &r.windows {
                Some(w) => std::sync::Arc::new(parse_windows(w, &field("windows"))?),
                None => policy.windows.clone(),
            };
            if windows.is_empty() {
                return Err(err(
                    r.name.span(),
                    field("windows"),
                    "no maintenance window: give the instance windows or the fleet default [[fleet.windows]]".into(),
                ));
            }
            let mut extra_dirs = Vec::new();
            for (j, d) in r.extra_dirs.iter().enumerate() {
                if let Some(reason) = bmfleet_proto::refuse_data_dir(d.get_ref()) {
                    return Err(err(
                        d.span(),
                        format!("instance[{i}].extra_dirs[{j}]"),
                        reason,
                    ));
                }
                extra_dirs.push(d.get_ref().clone());
            }
            instances.push(InstanceSpec {
                name,
                origin: r.origin.into_inner(),
                target: r.target.into_inner(),
                service_ip: ip,
                prefix,
                origin_interface,
                target_interface,
                profile,
                windows,
                downtime_budget_secs: r
                    .downtime_budget_secs
                    .unwrap_or(policy.downtime_budget_secs),
                mynetworks: r.mynetworks,
                extra_dirs,
                db_sync: match &r.db_sync {
                    Some(d) => DbSync::parse(d.get_ref())
                        .map_err(|m| err(d.span(), field("db_sync"), m))?,
                    None => policy.db_sync,
                },
                remigrate: false,
                estimate: r.estimate,
                notify: named(&lines, &r.notify, &field("notify")),
                contact: r
                    .contact
                    .map(|c| serde_json::to_value(c).unwrap_or_default()),
                gate: match &r.gate {
                    Some(g) => Some(NamedAt {
                        name: g.get_ref().clone(),
                        line: lines.line(g.span().start),
                        field: field("gate"),
                    }),
                    None => policy.gate.clone(),
                },
            });
        }
        Ok(FleetFile { policy, instances })
    }
}

/// Receiver names with their lines.
fn named(lines: &Lines, names: &[Spanned<String>], field: &str) -> Vec<NamedAt> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| NamedAt {
            name: n.get_ref().clone(),
            line: lines.line(n.span().start),
            field: format!("{field}[{i}]"),
        })
        .collect()
}

impl FleetFile {
    /// Every receiver the file names is one the orchestrator has (`known`), or the error
    /// names the first that is not, with its line.
    pub fn check_receivers(&self, known: &[String], file: &str) -> Result<(), FleetFileError> {
        let all = self
            .policy
            .notify
            .iter()
            .chain(self.instances.iter().flat_map(|i| &i.notify))
            .chain(self.policy.gate.iter())
            .chain(self.instances.iter().filter_map(|i| i.gate.as_ref()));
        for n in all {
            if !known.contains(&n.name) {
                return Err(FleetFileError {
                    file: file.to_string(),
                    line: n.line,
                    field: n.field.clone(),
                    message: format!(
                        "no receiver '{}' in the orchestrator's configuration ([[notify]]: {})",
                        n.name,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Linux's rules for an interface name (dev_valid_name: 1-15 bytes, not `.` or `..`, no `/`,
/// `:` or whitespace), and no leading `-` (it would read as an option to `ip`).
pub fn validate_interface(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "'{name}' is not an interface name: 1 to 15 characters"
        ));
    }
    if name == "." || name == ".." || name.starts_with('-') {
        return Err(format!("'{name}' is not an interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "'{name}' is not an interface name: it contains {c:?}"
        ));
    }
    Ok(())
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("'{text}' is not an address with its prefix length, e.g. 198.18.0.100/24");
    let (ip, prefix) = text.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix == 0 || prefix > max {
        return Err(format!("prefix /{prefix} is out of range for {ip}"));
    }
    Ok((ip, prefix))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fleet of one instance, `mail-01` (other modules' tests use it too).
    pub(crate) const BASE: &str = r#"[fleet]
name = "night-1"
max_concurrent_downtime = 2

[[fleet.windows]]
days = ["mon", "tue"]
start = "22:00"
end = "05:00"
timezone = "Europe/Paris"

[[instance]]
name = "mail-01"
origin = "origin-1"
target = "target-1"
service_ip = "198.18.0.101/24"
"#;

    fn with(extra: &str) -> Result<FleetFile, FleetFileError> {
        FleetFile::parse(&format!("{BASE}{extra}"), "fleet.toml")
    }

    #[test]
    fn a_valid_file_takes_the_fleet_defaults() {
        let f = with("").unwrap();
        assert_eq!(f.policy.name, "night-1");
        let i = &f.instances[0];
        assert_eq!(
            (i.service_ip.to_string(), i.prefix),
            ("198.18.0.101".into(), 24)
        );
        assert_eq!(i.windows.len(), 1);
        assert_eq!(i.downtime_budget_secs, 900);
        assert_eq!(i.profile, Profile::Auto);
        assert_eq!(
            (f.policy.pre_window_round_secs, f.policy.pre_window_rounds),
            (2, 4)
        );
    }

    #[test]
    fn pre_window_rounds_out_of_range_are_refused_with_their_line() {
        for bad in ["0", "11"] {
            let text = BASE.replacen(
                "max_concurrent_downtime = 2\n",
                &format!("max_concurrent_downtime = 2\npre_window_rounds = {bad}\n"),
                1,
            );
            let e = FleetFile::parse(&text, "fleet.toml").unwrap_err();
            assert_eq!(e.field, "fleet.pre_window_rounds", "{e}");
            assert!(e.message.contains("from 1"), "{e}");
            let line = text
                .lines()
                .position(|l| l.starts_with("pre_window_rounds"))
                .unwrap()
                + 1;
            assert_eq!(e.line, line, "{e}");
        }
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let f = FleetFile::parse(
            include_str!("../../deploy/fleet.example.toml"),
            "fleet.example.toml",
        )
        .unwrap();
        assert!(f.instances.len() >= 3);
    }

    fn refused(extra: &str) -> FleetFileError {
        with(extra).unwrap_err()
    }

    #[test]
    fn refusals_name_the_line_and_the_field() {
        let second = |body: &str| format!("\n[[instance]]\n{body}\n");
        let cases = [
            (
                second("name = \"mail-01\"\norigin = \"origin-2\"\ntarget = \"target-2\"\nservice_ip = \"198.18.0.102/24\""),
                18,
                "instance[1].name",
                "already the name of the instance at line 12",
            ),
            (
                second("name = \"mail-02\"\norigin = \"origin-2\"\ntarget = \"target-1\"\nservice_ip = \"198.18.0.102/24\""),
                20,
                "instance[1].target",
                "agent 'target-1' is already used by instance 'mail-01'",
            ),
            (
                second("name = \"mail-02\"\norigin = \"origin-2\"\ntarget = \"target-2\"\nservice_ip = \"198.18.0.101/24\""),
                21,
                "instance[1].service_ip",
                "198.18.0.101 is already the service IP of instance 'mail-01'",
            ),
            (
                second("name = \"mail-02\"\norigin = \"origin-2\"\ntarget = \"target-2\"\nservice_ip = \"198.18.0.102\""),
                21,
                "instance[1].service_ip",
                "prefix length",
            ),
            (
                second("name = \"mail-02\"\norigin = \"origin-2\"\ntarget = \"target-2\"\nservice_ip = \"198.18.0.102/24\"\n[[instance.windows]]\ndays = [\"mon\"]\nstart = \"23:00\"\nend = \"23:60\"\ntimezone = \"UTC\""),
                22,
                "instance[1].windows[0]",
                "invalid time '23:60'",
            ),
            (
                second("name = \"mail-02\"\norigin = \"origin-2\"\ntarget = \"target-2\"\nservice_ip = \"198.18.0.102/24\"\nbluemind = \"6\""),
                22,
                "instance[1].bluemind",
                "unknown profile '6'",
            ),
        ];
        for (extra, line, field, message) in cases {
            let e = refused(&extra);
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
            assert!(e.message.contains(message), "{e}");
        }
    }

    #[test]
    fn system_trees_and_bad_interfaces_are_refused_with_their_line() {
        let cases = [
            (
                "extra_dirs = [\"/\"]\n",
                "instance[0].extra_dirs[0]",
                "whole host",
            ),
            (
                "extra_dirs = [\"/var/spool/x\", \"/etc\"]\n",
                "instance[0].extra_dirs[1]",
                "inside the system tree /etc",
            ),
            (
                "extra_dirs = [\"/root/.ssh\"]\n",
                "instance[0].extra_dirs[0]",
                "inside the system tree /root",
            ),
            (
                "extra_dirs = [\"/var\"]\n",
                "instance[0].extra_dirs[0]",
                "contains the system tree /var/lib/bmfleet",
            ),
            (
                "extra_dirs = [\"/var/lib/bmfleet-agent/journal\"]\n",
                "instance[0].extra_dirs[0]",
                "inside the system tree /var/lib/bmfleet-agent",
            ),
            (
                "interface = \"-eth0\"\n",
                "instance[0].interface",
                "not an interface name",
            ),
            (
                "interface = \"eth0 up\"\n",
                "instance[0].interface",
                "contains ' '",
            ),
            (
                "interface = \"a-very-long-name0\"\n",
                "instance[0].interface",
                "1 to 15",
            ),
            (
                "target_interface = \"ens18/x\"\n",
                "instance[0].target_interface",
                "contains '/'",
            ),
            (
                "origin_interface = \"\"\n",
                "instance[0].origin_interface",
                "1 to 15",
            ),
        ];
        for (extra, field, message) in cases {
            let e = refused(extra);
            assert_eq!((e.line, e.field.as_str()), (16, field), "{e}");
            assert!(e.message.contains(message), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let e = refused("interfce = \"eth1\"\n");
        assert_eq!(e.line, 16, "{e}");
        assert!(e.message.contains("unknown field `interfce`"), "{e}");
        assert!(e.to_string().starts_with("fleet.toml:16: "), "{e}");
    }
}
