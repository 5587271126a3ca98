//! `bmctl fleet plan`: the projected schedule of a fleet file — which instance opens its cold
//! sync when, in which window, with what projected downtime — from the file's estimates and
//! rates (or measured passes), following the scheduler's rules. Changes nothing.

use jiff::Timestamp;

use crate::fleet::FleetFile;
use crate::machine::Instance;
use crate::scheduler::projected_downtime_ms;
use crate::windows::{self, Window};

/// One instance's projected cold sync.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedSync {
    /// The instance.
    pub instance: String,
    /// Migrated alone before the others.
    pub canary: bool,
    /// When its cold sync starts, if it fits a window in the horizon.
    pub start: Option<Timestamp>,
    /// Projected downtime, seconds.
    pub projected_secs: i64,
    /// Its downtime budget, seconds.
    pub budget_secs: u64,
    /// The window's zone.
    pub zone: String,
    /// Why it has no start, or what it waits for.
    pub note: String,
}

/// How far ahead the plan looks for windows.
const HORIZON_OPENINGS: usize = 120;

/// Downtime intervals already placed (start, end; Unix ms), indexed by start: placing one
/// more looks only at the intervals near it, so a thousand instances place in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Planned {
    by_start: std::collections::BTreeMap<i64, Vec<i64>>,
    longest: i64,
}

impl Planned {
    /// Adds the interval `[start, end)`.
    pub fn push(&mut self, start: i64, end: i64) {
        self.longest = self.longest.max(end - start);
        self.by_start.entry(start).or_default().push(end);
    }

    /// The latest end of all intervals.
    pub fn last_end(&self) -> Option<i64> {
        self.by_start.values().flatten().copied().max()
    }

    /// The ends of the intervals overlapping `[from, until)`.
    fn overlapping(&self, from: i64, until: i64) -> impl Iterator<Item = i64> + '_ {
        self.by_start
            .range(from.saturating_sub(self.longest)..until)
            .flat_map(|(_, ends)| ends.iter().copied())
            .filter(move |e| *e > from)
    }

    /// The latest start closer than `stagger` to `t`.
    fn latest_start_near(&self, t: i64, stagger: i64) -> Option<i64> {
        if stagger <= 0 {
            return None;
        }
        self.by_start
            .range(t - stagger + 1..t + stagger)
            .next_back()
            .map(|(s, _)| *s)
    }
}

/// The earliest start at or after `from` (Unix ms) inside one of `windows` where `projected`
/// ms fit before the window closes, fewer than `max_down` of the `planned` intervals overlap,
/// and no planned start is closer than `stagger` ms. None when nothing fits in the horizon.
/// Each move is exact: every start it skips breaks one of the rules.
pub fn place(
    windows: &[Window],
    from: i64,
    projected: i64,
    planned: &Planned,
    max_down: usize,
    stagger: i64,
) -> Option<i64> {
    place_after(windows, from, from, projected, planned, max_down, stagger)
}

/// [`place`], knowing that no start before `blocked_until` can fit (the horizon still counts
/// from `from`).
fn place_after(
    windows: &[Window],
    from: i64,
    blocked_until: i64,
    projected: i64,
    planned: &Planned,
    max_down: usize,
    stagger: i64,
) -> Option<i64> {
    let mut from = from;
    'openings: for _ in 0..HORIZON_OPENINGS {
        let opening = Timestamp::from_millisecond(from)
            .ok()
            .and_then(|t| windows::next_opening(windows, t))?;
        let end = opening.end.as_millisecond();
        let mut t = opening.start.as_millisecond().max(from).max(blocked_until);
        loop {
            if t + projected > end {
                from = end;
                continue 'openings;
            }
            // Until the first of the overlapping intervals ends, as many overlap.
            let (count, first_end) = planned
                .overlapping(t, t + projected)
                .fold((0usize, i64::MAX), |(c, m), e| (c + 1, m.min(e)));
            if count >= max_down {
                t = first_end;
                continue;
            }
            // Every start before `s + stagger` is too close to `s`.
            if let Some(s) = planned.latest_start_near(t, stagger) {
                t = s + stagger;
                continue;
            }
            return Some(t);
        }
    }
    None
}

/// What earlier placements proved, per (window list, earliest start, concurrency): a start
/// that did not fit a downtime `p` does not fit any longer one, nor later, once more is
/// planned (every rule only gets stricter). So a placement of `p` may start its search where
/// one of a shorter or equal downtime ended, and none fits if none fitted a shorter one. It
/// keeps the ETA of thousands of waiting instances from scanning every planned interval for
/// each of them.
#[derive(Default)]
pub struct Bounds {
    /// Per key, each downtime searched and where its search ended (`None`: nothing fitted).
    seen: std::collections::HashMap<BoundKey, Vec<(i64, Option<i64>)>>,
}

/// A window list (by address), an earliest start, a concurrency.
type BoundKey = (usize, i64, usize);

impl Bounds {
    /// [`place`], starting from what earlier placements with this `Bounds` proved, and
    /// recording what this one proves.
    pub fn place(
        &mut self,
        windows: &[Window],
        from: i64,
        projected: i64,
        planned: &Planned,
        max_down: usize,
        stagger: i64,
    ) -> Option<i64> {
        let key = (windows.as_ptr() as usize, from, max_down);
        let placed = self.lower(key, projected).and_then(|blocked_until| {
            place_after(
                windows,
                from,
                blocked_until,
                projected,
                planned,
                max_down,
                stagger,
            )
        });
        self.record(key, projected, placed);
        placed
    }

    /// Where a search for `projected` may start (`None`: nothing can fit).
    fn lower(&self, key: BoundKey, projected: i64) -> Option<i64> {
        let mut lower = key.1;
        for (p, found) in self.seen.get(&key).into_iter().flatten() {
            if *p <= projected {
                lower = lower.max((*found)?);
            }
        }
        Some(lower)
    }

    fn record(&mut self, key: BoundKey, projected: i64, found: Option<i64>) {
        let entries = self.seen.entry(key).or_default();
        match entries.iter_mut().find(|(p, _)| *p == projected) {
            Some(entry) => entry.1 = found,
            None => entries.push((projected, found)),
        }
    }
}

/// Plans every instance from `now`; `measured` gives instances' current states (last passes)
/// when an orchestrator is reachable.
pub fn plan(fleet: &FleetFile, now: Timestamp, measured: &[Instance]) -> Vec<PlannedSync> {
    plan_with(fleet, now, measured, true)
}

/// [`plan`], with or without what earlier placements proved (the test compares both).
fn plan_with(
    fleet: &FleetFile,
    now: Timestamp,
    measured: &[Instance],
    use_bounds: bool,
) -> Vec<PlannedSync> {
    let policy = &fleet.policy;
    let canaries = (policy.canary_count as usize).min(fleet.instances.len());
    let stagger = policy.min_stagger_secs as i64 * 1000;
    let mut planned = Planned::default();
    let mut after_canaries = now.as_millisecond();
    let mut out = Vec::new();
    let mut bounds = Bounds::default();
    for (n, spec) in fleet.instances.iter().enumerate() {
        let state = measured.get(n).cloned().unwrap_or_default();
        let projected = projected_downtime_ms(spec, &state, policy);
        let canary = n < canaries;
        let mut row = PlannedSync {
            instance: spec.name.clone(),
            canary,
            start: None,
            projected_secs: projected / 1000,
            budget_secs: spec.downtime_budget_secs,
            zone: spec
                .windows
                .first()
                .map(|w| w.tz_name.clone())
                .unwrap_or_default(),
            note: String::new(),
        };
        if projected > spec.downtime_budget_secs as i64 * 1000 {
            row.note = "projected downtime exceeds its budget: it will not be scheduled".into();
            out.push(row);
            continue;
        }
        let earliest = if canary {
            planned.last_end().unwrap_or(now.as_millisecond())
        } else {
            after_canaries
        };
        let max_down = if canary {
            1
        } else {
            policy.max_concurrent_downtime as usize
        };
        let placed = if use_bounds {
            bounds.place(
                &spec.windows,
                earliest,
                projected,
                &planned,
                max_down,
                stagger,
            )
        } else {
            place(
                &spec.windows,
                earliest,
                projected,
                &planned,
                max_down,
                stagger,
            )
        };
        if let Some(t) = placed {
            planned.push(t, t + projected);
            row.start = Timestamp::from_millisecond(t).ok();
            if canary {
                after_canaries = after_canaries.max(t + projected);
            }
        }
        if row.start.is_none() {
            row.note = "no window in the horizon fits its projected downtime".into();
        } else if !canary && canaries > 0 && policy.canary_approval {
            row.note = "after the canaries and `bmctl fleet approve`".into();
        }
        out.push(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_plan_respects_windows_canaries_concurrency_and_stagger() {
        let fleet =
            FleetFile::parse(include_str!("../../deploy/fleet.example.toml"), "example").unwrap();
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let rows = plan(&fleet, now, &[]);
        assert_eq!(rows.len(), 3);
        let starts: Vec<i64> = rows
            .iter()
            .map(|r| r.start.unwrap().as_millisecond())
            .collect();
        for (row, spec) in rows.iter().zip(&fleet.instances) {
            let start = row.start.unwrap();
            let opening = windows::open_at(&spec.windows, start).expect("starts inside a window");
            assert!(
                start.as_millisecond() + row.projected_secs * 1000 <= opening.end.as_millisecond()
            );
        }
        // The canary (mail-01) ends before anyone else starts.
        let canary_end = starts[0] + rows[0].projected_secs * 1000;
        assert!(starts[1] >= canary_end && starts[2] >= canary_end);
        assert!((starts[1] - starts[2]).abs() >= 120_000, "stagger");
    }

    /// The placement as first written: every rule checked against every interval.
    fn reference_place(
        windows: &[Window],
        from: i64,
        projected: i64,
        planned: &[(i64, i64)],
        max_down: usize,
        stagger: i64,
    ) -> Option<i64> {
        let mut from = from;
        'openings: for _ in 0..HORIZON_OPENINGS {
            let opening = Timestamp::from_millisecond(from)
                .ok()
                .and_then(|t| windows::next_opening(windows, t))?;
            let end = opening.end.as_millisecond();
            let mut t = opening.start.as_millisecond().max(from);
            loop {
                if t + projected > end {
                    from = end;
                    continue 'openings;
                }
                let overlapping: Vec<i64> = planned
                    .iter()
                    .filter(|(s, e)| *s < t + projected && t < *e)
                    .map(|(_, e)| *e)
                    .collect();
                if overlapping.len() >= max_down {
                    t = overlapping.into_iter().min().unwrap_or(t + 60_000);
                    continue;
                }
                if let Some(s) = planned
                    .iter()
                    .map(|(s, _)| *s)
                    .find(|s| (t - s).abs() < stagger)
                {
                    t = s + stagger;
                    continue;
                }
                return Some(t);
            }
        }
        None
    }

    proptest::proptest! {
        #[test]
        fn indexed_placement_finds_what_checking_every_interval_finds(
            fleet in proptest::collection::vec((0i64..3_600_000, 1i64..7_200_000), 0..60),
            projected in 1i64..7_200_000,
            from_offset in 0i64..86_400_000,
            max_down in 1usize..4,
            stagger in 0i64..1_800_000,
        ) {
            let days: Vec<String> = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                .iter()
                .map(|d| d.to_string())
                .collect();
            let windows = vec![Window::parse(&days, "22:00", "05:00", "Europe/Paris").unwrap()];
            let base: i64 = 1_800_000_000_000;
            // Intervals placed one after the other, as the planner does.
            let mut planned = Planned::default();
            let mut list = Vec::new();
            for (offset, length) in fleet {
                if let Some(t) = place(&windows, base + offset, length, &planned, max_down, stagger) {
                    planned.push(t, t + length);
                    list.push((t, t + length));
                }
            }
            let from = base + from_offset;
            proptest::prop_assert_eq!(
                place(&windows, from, projected, &planned, max_down, stagger),
                reference_place(&windows, from, projected, &list, max_down, stagger)
            );
        }
    }

    #[test]
    fn what_earlier_placements_proved_changes_no_start() {
        // Many instances, downtimes of a few sizes in any order, windows that fill up.
        let mut text = String::from(
            "[fleet]\nname = \"f\"\nmax_concurrent_downtime = 3\nmin_stagger_secs = 60\ncanary_count = 2\ndowntime_budget_secs = 14400\n\
             [[fleet.windows]]\ndays = [\"mon\",\"wed\",\"sat\"]\nstart = \"22:00\"\nend = \"02:00\"\ntimezone = \"Europe/Paris\"\n",
        );
        for i in 0..300 {
            let mib = [5.0, 90.0, 20.0, 400.0, 60.0][i % 5] * (1 + i % 3) as f64;
            text += &format!(
                "[[instance]]\nname = \"m{i}\"\norigin = \"o{i}\"\ntarget = \"t{i}\"\nservice_ip = \"198.18.{}.{}/24\"\n\
                 estimate = {{ files = {}, changed_mib = {mib}, database_mib = {} }}\n",
                i / 200,
                1 + i % 200,
                1000 * (1 + i % 7),
                // 25 MiB/s: from seconds to three hours, so that long ones leave the ends
                // of windows to shorter ones.
                [10.0, 270_000.0, 1_000.0, 90_000.0, 180_000.0, 30_000.0][i % 6]
            );
            if i % 17 == 0 {
                text += "[[instance.windows]]\ndays = [\"sun\"]\nstart = \"01:00\"\nend = \"05:00\"\ntimezone = \"UTC\"\n";
            }
        }
        let fleet = FleetFile::parse(&text, "f").unwrap();
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let starts = |rows: Vec<PlannedSync>| -> Vec<Option<Timestamp>> {
            rows.into_iter().map(|r| r.start).collect()
        };
        let with = starts(plan_with(&fleet, now, &[], true));
        assert_eq!(with, starts(plan_with(&fleet, now, &[], false)));
        assert!(with.iter().filter(|s| s.is_some()).count() > 250);
    }
}
