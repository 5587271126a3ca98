//! The fleet scheduler: which instance may start, run a hot pass, or open its cold sync now.
//! Pure: it reads the fleet's state and the time and returns grants; the engine turns them
//! into state-machine events.

use jiff::Timestamp;

use crate::fleet::{InstanceSpec, Policy};
use crate::machine::{Instance, Phase, Step};
use crate::windows;

/// Fleet-wide state the scheduler needs besides the instances.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetState {
    /// `bmctl fleet pause` without an instance: no new work starts.
    pub paused: bool,
    /// `bmctl fleet approve` after the canaries.
    pub approved: bool,
    /// When the last cold sync started, Unix ms.
    pub last_cold_start_ms: Option<i64>,
    /// The bandwidth limit each instance's running hot pass was granted (KiB/s): a pass
    /// re-attached after a restart is sent with the same limit, so it is the identical request.
    #[serde(default)]
    pub hot_pass_kib: std::collections::BTreeMap<String, u32>,
    /// This apply's run identity (random, made when the applied fleet's engine first opens;
    /// a new apply, a remigration or an empty state DB make another): every operation and
    /// grant id carries it, so an agent never answers a new run from an earlier one's replies.
    #[serde(default)]
    pub run: String,
}

/// What the scheduler lets happen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Start the instance (preflight).
    Begin(usize),
    /// Run a hot pass with this bandwidth limit (KiB/s, 0: none).
    HotPass(usize, u32),
    /// Open the cold sync; the window closes at this instant (Unix ms).
    ColdSync(usize, i64),
}

/// Why an instance waits (for `bmctl fleet plan` and status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// No window is open now.
    NoWindow,
    /// The projected downtime does not fit the rest of the window.
    WindowTooShort,
    /// The projected downtime exceeds the instance's budget.
    OverBudget,
    /// Too many instances are down.
    Concurrency,
    /// Too soon after the previous cold-sync start.
    Stagger,
    /// Canaries first.
    Canaries,
    /// Waiting for `bmctl fleet approve`.
    Approval,
    /// The failure budget is spent.
    FailureBudget,
    /// The fleet is paused.
    FleetPaused,
}

/// The downtime an instance is projected to need, ms: the final pass's scan and transfer at
/// the rates its last pass measured (the fleet's rates before any pass), plus the databases at
/// the restore rate (the comparison rate when they follow the origin), plus stopping and
/// starting services.
pub fn projected_downtime_ms(spec: &InstanceSpec, instance: &Instance, policy: &Policy) -> i64 {
    let rates = policy.rates;
    let (scan_ms, transfer_ms) = match &instance.last_pass {
        Some(p) if p.elapsed_ms > 0 => {
            let transfer = p.elapsed_ms.saturating_sub(p.scan_ms) as f64;
            (p.scan_ms as f64, transfer)
        }
        _ => (
            spec.estimate.files as f64 / rates.scan_files_per_sec * 1000.0,
            spec.estimate.changed_mib / rates.transfer_mib_per_sec * 1000.0,
        ),
    };
    // A standby that follows the origin is only compared in the downtime; a dump is
    // restored there.
    let database_rate = if instance.databases.as_ref().is_some_and(|d| d.stream) {
        rates.checksum_mib_per_sec
    } else {
        rates.restore_mib_per_sec
    };
    let database_ms = spec.estimate.database_mib / database_rate * 1000.0;
    // The final pass and the database move run in parallel.
    (rates.services_secs * 1000.0 + (scan_ms + transfer_ms).max(database_ms)) as i64
}

fn running(instance: &Instance, step: Step) -> bool {
    instance.running.contains_key(&step)
}

/// Decides the grants for `now`.
pub fn decide(
    policy: &Policy,
    specs: &[InstanceSpec],
    instances: &[Instance],
    fleet: &FleetState,
    now_ms: i64,
) -> Vec<Grant> {
    let mut grants = Vec::new();
    if fleet.paused {
        return grants;
    }
    let hot_running = instances
        .iter()
        .filter(|i| {
            running(i, Step::HotPass)
                || running(i, Step::PreWindowPass)
                || running(i, Step::Preflight)
        })
        .count();
    let mut hot_slots = (policy.max_parallel_hot_syncs as usize).saturating_sub(hot_running);
    let share_kib = if policy.bandwidth_budget_mib == 0 {
        0
    } else {
        (policy.bandwidth_budget_mib * 1024 / policy.max_parallel_hot_syncs.max(1)).max(1)
    };
    for (n, i) in instances.iter().enumerate() {
        if hot_slots == 0 {
            break;
        }
        let grant = match i.phase {
            Phase::Pending => Some(Grant::Begin(n)),
            Phase::HotSync if i.running.is_empty() && !i.pause_requested => {
                Some(Grant::HotPass(n, share_kib))
            }
            _ => None,
        };
        if let Some(g) = grant {
            grants.push(g);
            hot_slots -= 1;
        }
    }
    let mut last_start = fleet.last_cold_start_ms;
    let mut down = instances
        .iter()
        .filter(|i| i.phase.is_down() || i.phase == Phase::PreWindowPass)
        .count();
    // What every converged instance's permission shares is read once: a fleet of thousands
    // asks at every event.
    let mut shared = Shared::new(policy, specs, instances);
    for (n, (spec, i)) in specs.iter().zip(instances).enumerate() {
        if i.phase != Phase::Converged {
            continue;
        }
        // Refused for every instance alike: none of the rest can open either.
        if down >= policy.max_concurrent_downtime as usize || stagger(policy, last_start, now_ms) {
            break;
        }
        if let Ok(opening) = cold_sync_allowed(
            policy,
            fleet,
            &mut shared,
            n,
            spec,
            i,
            now_ms,
            down,
            last_start,
        ) {
            grants.push(Grant::ColdSync(n, opening));
            down += 1;
            last_start = Some(now_ms);
        }
    }
    grants
}

/// Too soon after the previous cold-sync start.
fn stagger(policy: &Policy, last_start: Option<i64>, now_ms: i64) -> bool {
    last_start.is_some_and(|t| now_ms < t + policy.min_stagger_secs as i64 * 1000)
}

/// What every cold sync's permission depends on besides the instance itself.
struct Shared<'a> {
    /// Failed and rolled-back instances.
    failed: usize,
    /// How many canaries the fleet has.
    canaries: usize,
    /// Every canary is Done.
    canaries_done: bool,
    /// The first instance not finished (the fleet's length when all are).
    first_unfinished: usize,
    /// The window open now of each distinct list of windows (most instances share the
    /// fleet's): time-zone arithmetic once per list, not once per instance.
    open: Vec<(&'a [windows::Window], Option<windows::Opening>)>,
}

impl<'a> Shared<'a> {
    fn new(policy: &Policy, specs: &[InstanceSpec], instances: &[Instance]) -> Self {
        let canaries = (policy.canary_count as usize).min(specs.len());
        Shared {
            failed: instances
                .iter()
                .filter(|i| matches!(i.phase, Phase::Failed | Phase::RolledBack))
                .count(),
            canaries,
            canaries_done: instances[..canaries.min(instances.len())]
                .iter()
                .all(|i| i.phase == Phase::Done),
            first_unfinished: instances
                .iter()
                .position(|i| !i.phase.is_final())
                .unwrap_or(instances.len()),
            open: Vec::new(),
        }
    }

    /// The window of `list` open at `now`.
    fn open_at(&mut self, list: &'a [windows::Window], now: Timestamp) -> Option<windows::Opening> {
        if let Some((_, opening)) = self.open.iter().find(|(l, _)| windows::same(l, list)) {
            return *opening;
        }
        let opening = windows::open_at(list, now);
        self.open.push((list, opening));
        opening
    }
}

/// Whether instance `n` may open its cold sync now; Ok with the window's end.
#[allow(clippy::too_many_arguments)]
fn cold_sync_allowed<'a>(
    policy: &Policy,
    fleet: &FleetState,
    shared: &mut Shared<'a>,
    n: usize,
    spec: &'a InstanceSpec,
    instance: &Instance,
    now_ms: i64,
    down: usize,
    last_start: Option<i64>,
) -> Result<i64, Wait> {
    if fleet.paused {
        return Err(Wait::FleetPaused);
    }
    if shared.failed >= policy.failure_budget as usize && policy.failure_budget > 0 {
        return Err(Wait::FailureBudget);
    }
    if n < shared.canaries {
        // A canary goes alone, and after the canaries before it.
        if down > 0 || shared.first_unfinished < n {
            return Err(Wait::Canaries);
        }
    } else {
        if !shared.canaries_done {
            return Err(Wait::Canaries);
        }
        if shared.canaries > 0 && policy.canary_approval && !fleet.approved {
            return Err(Wait::Approval);
        }
    }
    if down >= policy.max_concurrent_downtime as usize {
        return Err(Wait::Concurrency);
    }
    if stagger(policy, last_start, now_ms) {
        return Err(Wait::Stagger);
    }
    let now = Timestamp::from_millisecond(now_ms).map_err(|_| Wait::NoWindow)?;
    let opening = shared.open_at(&spec.windows, now).ok_or(Wait::NoWindow)?;
    let projected = projected_downtime_ms(spec, instance, policy);
    if projected > spec.downtime_budget_secs as i64 * 1000 {
        return Err(Wait::OverBudget);
    }
    let end_ms = opening.end.as_millisecond();
    if now_ms + projected > end_ms {
        return Err(Wait::WindowTooShort);
    }
    Ok(end_ms)
}
