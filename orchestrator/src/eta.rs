//! Progress and ETA from measured rates: each instance's expected finish, from the downtime
//! and post-migration durations the finished instances measured (the projection before any),
//! placed in windows with the scheduler's rules (concurrency, stagger, canaries). Pure.

use crate::fleet::FleetFile;
use crate::machine::{Instance, Phase, Step};
use crate::plan::{Bounds, Planned};
use crate::scheduler::projected_downtime_ms;

/// Post-migration and verification before anything was measured, ms.
const DEFAULT_POST_MS: i64 = 60_000;

/// Share of the way from Pending to Done, 0 to 100, by the steps behind the instance.
pub fn progress_percent(i: &Instance) -> u8 {
    match i.phase {
        Phase::Pending | Phase::Paused | Phase::Aborted => 0,
        Phase::Preflight => 5,
        Phase::HotSync => (10 + 5 * i.hot_passes.min(6)) as u8,
        Phase::Converged => 40,
        Phase::PreWindowPass => 45,
        Phase::ColdSync => {
            let done = [
                Step::StopOrigin,
                Step::StopTarget,
                Step::FinalPass,
                Step::Databases,
                Step::Config,
            ]
            .iter()
            .filter(|s| i.cold_done.contains(s))
            .count();
            (50 + 5 * done) as u8
        }
        Phase::Cutover => 78,
        Phase::StartServices => 82,
        Phase::PostMigration => 88,
        Phase::Verify => 95,
        Phase::RollingBack => 50,
        Phase::Done | Phase::RolledBack | Phase::Failed => 100,
    }
}

fn mean(values: impl Iterator<Item = i64>) -> Option<i64> {
    let (sum, n) = values.fold((0i64, 0i64), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n)
}

/// Every instance's expected finish (Unix ms), in fleet-file order; None when it will not be
/// scheduled (over budget, no window in the horizon).
pub fn finishes(fleet: &FleetFile, instances: &[Instance], now_ms: i64) -> Vec<Option<i64>> {
    let policy = &fleet.policy;
    let measured_downtime = mean(
        instances
            .iter()
            .filter_map(|i| Some(i.downtime_end_ms? - i.downtime_start_ms?))
            .filter(|d| *d > 0),
    );
    let post = mean(
        instances
            .iter()
            .filter(|i| i.phase == Phase::Done)
            .filter_map(|i| Some(i.finished_ms? - i.downtime_end_ms?)),
    )
    .unwrap_or(DEFAULT_POST_MS);
    let downtime = |n: usize| {
        measured_downtime
            .unwrap_or_else(|| projected_downtime_ms(&fleet.instances[n], &instances[n], policy))
    };
    // Windows already running count against concurrency and stagger.
    let mut planned = Planned::default();
    for (n, i) in instances.iter().enumerate() {
        if let (true, Some(s)) = (i.phase.is_down(), i.downtime_start_ms) {
            planned.push(s, (s + downtime(n)).max(now_ms));
        }
    }
    let canaries = (policy.canary_count as usize).min(instances.len());
    let stagger = policy.min_stagger_secs as i64 * 1000;
    let mut out = vec![None; instances.len()];
    let mut after_canaries = now_ms;
    let mut bounds = Bounds::default();
    for (n, i) in instances.iter().enumerate() {
        let finish = match i.phase {
            p if p.is_final() => Some(i.finished_ms.unwrap_or(now_ms)),
            Phase::PostMigration | Phase::Verify => {
                Some(i.downtime_end_ms.unwrap_or(now_ms) + post)
            }
            p if p.is_down() => Some(i.downtime_start_ms.unwrap_or(now_ms) + downtime(n) + post),
            _ => {
                let spec = &fleet.instances[n];
                let from = if n < canaries { now_ms } else { after_canaries };
                let max_down = if n < canaries {
                    1
                } else {
                    policy.max_concurrent_downtime as usize
                };
                bounds
                    .place(
                        &spec.windows,
                        from,
                        downtime(n),
                        &planned,
                        max_down,
                        stagger,
                    )
                    .map(|t| {
                        planned.push(t, t + downtime(n));
                        t + downtime(n) + post
                    })
            }
        };
        if n < canaries {
            after_canaries = after_canaries.max(finish.unwrap_or(now_ms));
        }
        out[n] = finish.map(|f| f.max(now_ms));
    }
    out
}

/// When the whole fleet is expected to be finished, Unix ms.
pub fn fleet_finish(fleet: &FleetFile, instances: &[Instance], now_ms: i64) -> Option<i64> {
    finishes(fleet, instances, now_ms)
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}
