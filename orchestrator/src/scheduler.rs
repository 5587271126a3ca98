//! The fleet scheduler: which instance may start, run a hot pass, or open its cold sync now.
//! Pure: it reads the fleet's state and the time and returns grants; the engine turns them
//! into state-machine events.

use std::collections::BTreeSet;

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
    /// Read from a state DB made before each instance's hot-pass bandwidth limit moved to its
    /// own row (then this map was rewritten whole at every transition); never written again.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
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

/// The instance holds one of the live passes' slots (`max_parallel_hot_syncs`).
fn holds_hot_slot(instance: &Instance) -> bool {
    running(instance, Step::HotPass)
        || running(instance, Step::PreWindowPass)
        || running(instance, Step::Preflight)
}

/// How many phases there are ([`Phase`]'s last variant, plus one).
const PHASE_COUNT: usize = Phase::Aborted as usize + 1;

/// The fleet's instances grouped as the scheduler and the engine's loop look at them, kept
/// current transition by transition ([`Index::update`]): a fleet of thousands is not walked
/// at every event, only the instances that can be granted something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    counts: [usize; PHASE_COUNT],
    pending: BTreeSet<usize>,
    hot_sync: BTreeSet<usize>,
    converged: BTreeSet<usize>,
    unfinished: BTreeSet<usize>,
    hot_slots_held: usize,
    running: usize,
    /// Instances inside their downtime ([`Phase::is_down`]).
    down: usize,
    /// One instance of each distinct list of windows (most instances share the fleet's).
    window_lists: Vec<usize>,
}

impl Index {
    /// The index of `instances` (in fleet-file order, as `specs`).
    pub fn new(specs: &[InstanceSpec], instances: &[Instance]) -> Self {
        let mut window_lists: Vec<usize> = Vec::new();
        for (n, spec) in specs.iter().enumerate() {
            if !window_lists
                .iter()
                .any(|&k| windows::same(&specs[k].windows, &spec.windows))
            {
                window_lists.push(n);
            }
        }
        let mut index = Index {
            window_lists,
            counts: [0; PHASE_COUNT],
            pending: BTreeSet::new(),
            hot_sync: BTreeSet::new(),
            converged: BTreeSet::new(),
            unfinished: BTreeSet::new(),
            hot_slots_held: 0,
            running: 0,
            down: 0,
        };
        for (n, i) in instances.iter().enumerate() {
            index.count(n, i, true);
        }
        index
    }

    /// Instance `n` went from `old` to `new`.
    pub fn update(&mut self, n: usize, old: &Instance, new: &Instance) {
        self.count(n, old, false);
        self.count(n, new, true);
    }

    /// Counts instance `n` in (`add`) or out.
    fn count(&mut self, n: usize, i: &Instance, add: bool) {
        let step = |v: &mut usize| *v = if add { *v + 1 } else { v.saturating_sub(1) };
        step(&mut self.counts[i.phase as usize]);
        if holds_hot_slot(i) {
            step(&mut self.hot_slots_held);
        }
        if !i.running.is_empty() {
            step(&mut self.running);
        }
        if i.phase.is_down() {
            step(&mut self.down);
        }
        let set = match i.phase {
            Phase::Pending => Some(&mut self.pending),
            Phase::HotSync => Some(&mut self.hot_sync),
            Phase::Converged => Some(&mut self.converged),
            _ => None,
        };
        for set in set
            .into_iter()
            .chain((!i.phase.is_final()).then_some(&mut self.unfinished))
        {
            if add {
                set.insert(n);
            } else {
                set.remove(&n);
            }
        }
    }

    /// How many instances are in `phase`.
    pub fn in_phase(&self, phase: Phase) -> usize {
        self.counts[phase as usize]
    }

    /// How many instances are in any of `phases`.
    pub fn in_phases(&self, phases: &[Phase]) -> usize {
        phases.iter().map(|p| self.in_phase(*p)).sum()
    }

    /// Every instance is finished.
    pub fn all_final(&self) -> bool {
        self.unfinished.is_empty()
    }

    /// Some instance runs a step, is down, or has work the scheduler can still grant it
    /// without a window (starting, hot passes).
    pub fn busy(&self) -> bool {
        self.running > 0
            || self.down > 0
            || self.in_phases(&[
                Phase::Pending,
                Phase::Preflight,
                Phase::HotSync,
                Phase::PreWindowPass,
            ]) > 0
    }

    /// One instance of each distinct list of windows of the fleet.
    pub fn window_lists(&self) -> &[usize] {
        &self.window_lists
    }

    /// Failed and rolled-back instances.
    pub fn failed(&self) -> usize {
        self.in_phases(&[Phase::Failed, Phase::RolledBack])
    }

    /// Pending and hot-syncing instances, in fleet-file order.
    fn startable(&self) -> impl Iterator<Item = usize> + '_ {
        let (mut a, mut b) = (
            self.pending.iter().copied().peekable(),
            self.hot_sync.iter().copied().peekable(),
        );
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => None,
        })
    }
}

/// Decides the grants for `now` (`index`: [`Index`] of `instances`).
pub fn decide(
    policy: &Policy,
    specs: &[InstanceSpec],
    instances: &[Instance],
    index: &Index,
    fleet: &FleetState,
    now_ms: i64,
) -> Vec<Grant> {
    let mut grants = Vec::new();
    if fleet.paused {
        return grants;
    }
    let mut hot_slots =
        (policy.max_parallel_hot_syncs as usize).saturating_sub(index.hot_slots_held);
    let share_kib = if policy.bandwidth_budget_mib == 0 {
        0
    } else {
        (policy.bandwidth_budget_mib * 1024 / policy.max_parallel_hot_syncs.max(1)).max(1)
    };
    for n in index.startable() {
        if hot_slots == 0 {
            break;
        }
        let i = &instances[n];
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
    let mut down = index.down + index.in_phase(Phase::PreWindowPass);
    // What every converged instance's permission shares is read once: a fleet of thousands
    // asks at every event.
    let mut shared = Shared::new(policy, specs, instances, index);
    // No window open for any list: no converged instance can open (not one walked).
    let open_now = Timestamp::from_millisecond(now_ms).is_ok_and(|now| {
        index
            .window_lists
            .iter()
            .any(|&k| shared.open_at(&specs[k].windows, now).is_some())
    });
    if !open_now {
        return grants;
    }
    for &n in &index.converged {
        let (spec, i) = (&specs[n], &instances[n]);
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
    fn new(policy: &Policy, specs: &[InstanceSpec], instances: &[Instance], index: &Index) -> Self {
        let canaries = (policy.canary_count as usize).min(specs.len());
        Shared {
            failed: index.failed(),
            canaries,
            canaries_done: instances[..canaries.min(instances.len())]
                .iter()
                .all(|i| i.phase == Phase::Done),
            first_unfinished: index.unfinished.first().copied().unwrap_or(instances.len()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Running;
    use proptest::prelude::*;

    const SOME_PHASES: [Phase; 8] = [
        Phase::Pending,
        Phase::HotSync,
        Phase::Converged,
        Phase::PreWindowPass,
        Phase::ColdSync,
        Phase::Done,
        Phase::Failed,
        Phase::Paused,
    ];
    const SOME_STEPS: [Step; 4] = [
        Step::Preflight,
        Step::HotPass,
        Step::FinalPass,
        Step::Verify,
    ];

    fn instance(phase: usize, steps: &[usize]) -> Instance {
        let mut i = Instance {
            phase: SOME_PHASES[phase % SOME_PHASES.len()],
            ..Instance::default()
        };
        for s in steps {
            i.running.insert(
                SOME_STEPS[s % SOME_STEPS.len()],
                Running {
                    attempt: 1,
                    deadline_ms: 0,
                },
            );
        }
        i
    }

    proptest! {
        /// Kept current transition by transition, the index is the one built afresh from
        /// the instances where they ended (what the engine's loop and the scheduler read).
        #[test]
        fn an_index_kept_current_is_the_index_of_where_the_instances_are(
            start in proptest::collection::vec((0usize..8, proptest::collection::vec(0usize..4, 0..3)), 1..12),
            moves in proptest::collection::vec((0usize..12, 0usize..8, proptest::collection::vec(0usize..4, 0..3)), 0..40),
        ) {
            let fleet = crate::fleet::FleetFile::parse(crate::fleet::tests::BASE, "fleet.toml").unwrap();
            let spec = fleet.instances[0].clone();
            let specs = vec![spec; start.len()];
            let mut instances: Vec<Instance> = start.iter().map(|(p, s)| instance(*p, s)).collect();
            let mut index = Index::new(&specs, &instances);
            for (n, phase, steps) in moves {
                let n = n % instances.len();
                let new = instance(phase, &steps);
                index.update(n, &instances[n], &new);
                instances[n] = new;
            }
            let fresh = Index::new(&specs, &instances);
            prop_assert_eq!(&index, &fresh);
            // And what it answers is what a walk of the instances says.
            prop_assert_eq!(index.all_final(), instances.iter().all(|i| i.phase.is_final()));
            prop_assert_eq!(
                index.failed(),
                instances.iter().filter(|i| matches!(i.phase, Phase::Failed | Phase::RolledBack)).count()
            );
            let startable: Vec<usize> = index.startable().collect();
            let walked: Vec<usize> = (0..instances.len())
                .filter(|&n| matches!(instances[n].phase, Phase::Pending | Phase::HotSync))
                .collect();
            prop_assert_eq!(startable, walked);
            prop_assert_eq!(
                index.busy(),
                instances.iter().any(|i| !i.running.is_empty()
                    || i.phase.is_down()
                    || matches!(i.phase, Phase::Pending | Phase::Preflight | Phase::HotSync | Phase::PreWindowPass))
            );
        }
    }
}
