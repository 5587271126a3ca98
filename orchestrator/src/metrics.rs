//! The orchestrator's Prometheus metrics (`/metrics`, OpenMetrics text), with the Prometheus
//! project's own client. Names follow Prometheus conventions: `bmfleet_` prefix, base units,
//! `_total` counters (added by the encoder). A migrated BlueMind instance is the label
//! `server`: `instance` is Prometheus's own target label.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::fleet::FleetFile;
use crate::machine::{Event, Instance, Phase, Step};
use crate::scheduler::projected_downtime_ms;

/// Every phase, for the per-phase gauges (absent phases are exported as 0).
pub const PHASES: [Phase; 16] = [
    Phase::Pending,
    Phase::Preflight,
    Phase::HotSync,
    Phase::Converged,
    Phase::PreWindowPass,
    Phase::ColdSync,
    Phase::Cutover,
    Phase::StartServices,
    Phase::PostMigration,
    Phase::Verify,
    Phase::Done,
    Phase::RollingBack,
    Phase::RolledBack,
    Phase::Failed,
    Phase::Paused,
    Phase::Aborted,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WindowLabels {
    server: String,
    /// `opened` or `closed`.
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstancePhaseLabels {
    server: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassLabels {
    server: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceAgentLabels {
    server: String,
    agent: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    outcome: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotifyLabels {
    receiver: String,
    outcome: String,
}

/// The orchestrator's metrics.
pub struct Metrics {
    registry: Registry,
    instances: Family<PhaseLabels, Gauge>,
    instance_phase: Family<InstancePhaseLabels, Gauge>,
    downtime: Histogram,
    instance_downtime: Family<InstanceLabels, FloatGauge>,
    instance_down: Family<InstanceLabels, Gauge>,
    windows: Family<WindowLabels, Counter>,
    projected: Family<InstanceLabels, FloatGauge>,
    window_end: Family<InstanceLabels, FloatGauge>,
    budget: Family<InstanceLabels, FloatGauge>,
    pass_bytes: Family<PassLabels, Counter>,
    pass_files: Family<PassLabels, Counter>,
    passes: Family<PassLabels, Counter>,
    last_pass_bytes: Family<InstanceLabels, Gauge>,
    last_pass_files: Family<InstanceLabels, Gauge>,
    not_converging: Family<InstanceLabels, Gauge>,
    failures: Family<StepLabels, Counter>,
    agent_up: Family<AgentLabels, Gauge>,
    instance_agent: Family<InstanceAgentLabels, Gauge>,
    rpc: Family<RpcLabels, Histogram, fn() -> Histogram>,
    fleet_paused: Gauge,
    fleet_budget_spent: Gauge,
    notifications_undelivered: Gauge,
    notification_attempts: Family<NotifyLabels, Counter>,
    // The last phase seen per instance, to count phase changes once.
    seen: Mutex<HashMap<String, Phase>>,
    // When each instance that is down now went down, Unix ms: its downtime grows at every
    // scrape, not only at transitions (a hung step makes none).
    down_since: Mutex<std::collections::BTreeMap<String, i64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            instances: Family::default(),
            instance_phase: Family::default(),
            downtime: seconds_histogram(),
            instance_downtime: Family::default(),
            instance_down: Family::default(),
            windows: Family::default(),
            projected: Family::default(),
            window_end: Family::default(),
            budget: Family::default(),
            pass_bytes: Family::default(),
            pass_files: Family::default(),
            passes: Family::default(),
            last_pass_bytes: Family::default(),
            last_pass_files: Family::default(),
            not_converging: Family::default(),
            failures: Family::default(),
            agent_up: Family::default(),
            instance_agent: Family::default(),
            rpc: Family::new_with_constructor(rpc_histogram),
            fleet_paused: Gauge::default(),
            fleet_budget_spent: Gauge::default(),
            notifications_undelivered: Gauge::default(),
            notification_attempts: Family::default(),
            seen: Mutex::new(HashMap::new()),
            down_since: Mutex::new(std::collections::BTreeMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "bmfleet_instances",
            "Instances per phase",
            m.instances.clone(),
        );
        registry.register(
            "bmfleet_instance_phase",
            "1 for each instance's current phase",
            m.instance_phase.clone(),
        );
        registry.register(
            "bmfleet_downtime_seconds",
            "Downtime of finished windows, across the fleet",
            m.downtime.clone(),
        );
        registry.register(
            "bmfleet_instance_downtime_seconds",
            "Length of each instance's current or last downtime window",
            m.instance_downtime.clone(),
        );
        registry.register(
            "bmfleet_instance_down",
            "1 while the instance is in its downtime window",
            m.instance_down.clone(),
        );
        registry.register(
            "bmfleet_instance_windows",
            "Downtime windows opened and closed per instance (a window shorter than a scrape \
             interval never shows in bmfleet_instance_down; it shows here)",
            m.windows.clone(),
        );
        registry.register(
            "bmfleet_instance_projected_downtime_seconds",
            "Projected downtime of each instance",
            m.projected.clone(),
        );
        registry.register(
            "bmfleet_instance_downtime_budget_seconds",
            "Downtime budget of each instance",
            m.budget.clone(),
        );
        registry.register(
            "bmfleet_instance_agent",
            "1 for each instance's origin and target agent (joins agent health to instances)",
            m.instance_agent.clone(),
        );
        registry.register(
            "bmfleet_instance_window_end_timestamp_seconds",
            "End of the window granted for each instance's cold sync (Unix time)",
            m.window_end.clone(),
        );
        registry.register(
            "bmfleet_sync_pass_bytes",
            "Bytes changed by sync passes",
            m.pass_bytes.clone(),
        );
        registry.register(
            "bmfleet_sync_pass_files",
            "Files changed by sync passes",
            m.pass_files.clone(),
        );
        registry.register(
            "bmfleet_sync_passes",
            "Sync passes completed",
            m.passes.clone(),
        );
        registry.register(
            "bmfleet_last_pass_changed_bytes",
            "Bytes changed by each instance's last pass",
            m.last_pass_bytes.clone(),
        );
        registry.register(
            "bmfleet_last_pass_changed_files",
            "Files changed by each instance's last pass",
            m.last_pass_files.clone(),
        );
        registry.register(
            "bmfleet_instance_not_converging",
            "1 when the instance hit the maximum passes without converging",
            m.not_converging.clone(),
        );
        registry.register(
            "bmfleet_step_failures",
            "Failed step attempts, by step",
            m.failures.clone(),
        );
        registry.register(
            "bmfleet_agent_up",
            "1 when the agent answered its last health check",
            m.agent_up.clone(),
        );
        registry.register(
            "bmfleet_rpc_duration_seconds",
            "Agent and Fleet RPC latency, by method and outcome",
            m.rpc.clone(),
        );
        registry.register(
            "bmfleet_fleet_paused",
            "1 when the fleet is paused by an operator",
            m.fleet_paused.clone(),
        );
        registry.register(
            "bmfleet_fleet_failure_budget_spent",
            "1 when the failure budget stops new cold syncs",
            m.fleet_budget_spent.clone(),
        );
        registry.register(
            "bmfleet_notifications_undelivered",
            "Notifications in the outbox not delivered yet (retried with back-off)",
            m.notifications_undelivered.clone(),
        );
        registry.register(
            "bmfleet_notification_attempts",
            "Deliveries tried, by receiver and outcome",
            m.notification_attempts.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records an agent's health.
    pub fn agent_up(&self, agent: &str, up: bool) {
        self.agent_up
            .get_or_create(&AgentLabels {
                agent: agent.into(),
            })
            .set(i64::from(up));
    }

    /// Records one RPC's latency.
    pub fn rpc(&self, method: &str, ok: bool, seconds: f64) {
        let labels = RpcLabels {
            method: method.into(),
            outcome: if ok { "ok" } else { "error" }.into(),
        };
        self.rpc.get_or_create(&labels).observe(seconds);
    }

    /// Records a delivery attempt to `receiver`.
    pub fn notification_attempt(&self, receiver: &str, ok: bool) {
        self.notification_attempts
            .get_or_create(&NotifyLabels {
                receiver: receiver.into(),
                outcome: if ok { "delivered" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Records how many notifications wait for delivery.
    pub fn notifications_undelivered(&self, count: u64) {
        self.notifications_undelivered
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records the fleet-wide flags.
    pub fn fleet(&self, paused: bool, budget_spent: bool) {
        self.fleet_paused.set(i64::from(paused));
        self.fleet_budget_spent.set(i64::from(budget_spent));
    }

    /// Updates the gauges after a transition of `changed` caused by `event`: the phase counts,
    /// and the instance gauges of `changed` only (and of instances never seen yet): a
    /// transition changes no other instance, and a fleet of thousands makes hundreds of
    /// thousands of them.
    pub fn transition(
        &self,
        fleet: &FleetFile,
        instances: &[Instance],
        index: &crate::scheduler::Index,
        changed: usize,
        event: &Event,
        now_ms: i64,
    ) {
        for phase in PHASES {
            self.instances
                .get_or_create(&PhaseLabels {
                    phase: format!("{phase:?}"),
                })
                .set(index.in_phase(phase) as i64);
        }
        let Some(name) = fleet.instances.get(changed).map(|s| s.name.as_str()) else {
            return;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        // Instances never seen (a fleet just applied) get theirs too: the fleet is walked
        // only then.
        let touched: Vec<usize> = if seen.len() < fleet.instances.len() {
            fleet
                .instances
                .iter()
                .enumerate()
                .filter(|(n, spec)| *n == changed || !seen.contains_key(&spec.name))
                .map(|(n, _)| n)
                .collect()
        } else {
            vec![changed]
        };
        for n in touched {
            if let (Some(spec), Some(i)) = (fleet.instances.get(n), instances.get(n)) {
                self.instance_gauges(fleet, spec, i, now_ms, &mut seen, &mut since);
            }
        }
        drop((seen, since));
        match event {
            Event::Succeeded {
                step,
                stats: Some(s),
                ..
            } => {
                let kind = if *step == Step::FinalPass {
                    "cold"
                } else {
                    "hot"
                };
                let labels = PassLabels {
                    server: name.into(),
                    kind: kind.into(),
                };
                self.pass_bytes
                    .get_or_create(&labels)
                    .inc_by(s.bytes_changed);
                self.pass_files
                    .get_or_create(&labels)
                    .inc_by(s.files_changed);
                self.passes.get_or_create(&labels).inc();
            }
            Event::Failed { step, .. } => {
                self.failures
                    .get_or_create(&StepLabels {
                        step: step.as_str().into(),
                    })
                    .inc();
            }
            _ => {}
        }
    }

    /// One instance's gauges.
    fn instance_gauges(
        &self,
        fleet: &FleetFile,
        spec: &crate::fleet::InstanceSpec,
        i: &Instance,
        now_ms: i64,
        seen: &mut HashMap<String, Phase>,
        since: &mut std::collections::BTreeMap<String, i64>,
    ) {
        let name = spec.name.clone();
        for phase in PHASES {
            let labels = InstancePhaseLabels {
                server: name.clone(),
                phase: format!("{phase:?}"),
            };
            self.instance_phase
                .get_or_create(&labels)
                .set(i64::from(i.phase == phase));
        }
        for (agent, role) in [(&spec.origin, "origin"), (&spec.target, "target")] {
            let labels = InstanceAgentLabels {
                server: name.clone(),
                agent: agent.clone(),
                role: role.into(),
            };
            self.instance_agent.get_or_create(&labels).set(1);
        }
        let labels = InstanceLabels {
            server: name.clone(),
        };
        let down = i.downtime_start_ms.is_some() && i.downtime_end_ms.is_none();
        self.instance_down
            .get_or_create(&labels)
            .set(i64::from(down));
        match i.downtime_start_ms {
            Some(start) if down => since.insert(name.clone(), start),
            _ => since.remove(&name),
        };
        if let Some(start) = i.downtime_start_ms {
            let end = i.downtime_end_ms.unwrap_or(now_ms);
            self.instance_downtime
                .get_or_create(&labels)
                .set((end - start) as f64 / 1000.0);
        }
        let policy = &fleet.policy;
        self.projected
            .get_or_create(&labels)
            .set(projected_downtime_ms(spec, i, policy) as f64 / 1000.0);
        self.budget
            .get_or_create(&labels)
            .set(spec.downtime_budget_secs as f64);
        if let Some(end) = i.window_end_ms {
            self.window_end
                .get_or_create(&labels)
                .set(end as f64 / 1000.0);
        }
        if let Some(p) = &i.last_pass {
            self.last_pass_bytes
                .get_or_create(&labels)
                .set(p.bytes_changed as i64);
            self.last_pass_files
                .get_or_create(&labels)
                .set(p.files_changed as i64);
        }
        self.not_converging
            .get_or_create(&labels)
            .set(i64::from(i.not_converging));
        // Both counters exist from the instance's first transition on, at 0, so that the
        // first window's opening is an increase Prometheus sees. (A family's guard is never
        // held across another `get_or_create`: creating takes its write lock.)
        let was_down = seen.get(&name).map(|b| b.is_down());
        let opens = was_down == Some(false) && i.phase.is_down();
        let closes = was_down == Some(true) && !i.phase.is_down();
        for (event, now) in [("opened", opens), ("closed", closes)] {
            let counter = self.windows.get_or_create(&WindowLabels {
                server: name.clone(),
                event: event.into(),
            });
            if now {
                counter.inc();
            }
        }
        // A downtime window closes: one observation for the fleet histogram.
        if closes {
            if let (Some(s), Some(e)) = (i.downtime_start_ms, i.downtime_end_ms) {
                self.downtime.observe((e - s) as f64 / 1000.0);
            }
        }
        seen.insert(name, i.phase);
    }

    /// Brings the downtime of every instance that is down now to `now_ms`.
    pub fn refresh(&self, now_ms: i64) {
        let since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        for (server, start) in since.iter() {
            self.instance_downtime
                .get_or_create(&InstanceLabels {
                    server: server.clone(),
                })
                .set((now_ms - start).max(0) as f64 / 1000.0);
        }
    }

    /// The exposition, OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` on `address` from a thread of its own (see
/// [`bmfleet_proto::metrics_http::serve`]); every scrape first brings the downtime of the
/// instances that are down to `clock`'s now.
pub fn serve(
    metrics: Arc<Metrics>,
    clock: Arc<dyn crate::clock::Clock>,
    address: SocketAddr,
) -> std::io::Result<SocketAddr> {
    bmfleet_proto::metrics_http::serve(
        move || {
            metrics.refresh(clock.now_ms());
            metrics.encode()
        },
        address,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `line_start` (name and labels) in `text`.
    fn value(text: &str, line_start: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn a_window_shorter_than_a_scrape_still_counts_as_opened_and_closed() {
        let fleet = FleetFile::parse(crate::fleet::tests::BASE, "fleet.toml").unwrap();
        let m = Metrics::new();
        let mut i = Instance::default();
        assert_eq!(fleet.instances[0].name, "mail-01");
        let at = |m: &Metrics, i: &Instance, ms: i64| {
            let index =
                crate::scheduler::Index::new(&fleet.instances[..1], std::slice::from_ref(i));
            m.transition(&fleet, std::slice::from_ref(i), &index, 0, &Event::Tick, ms)
        };
        let opened = r#"bmfleet_instance_windows_total{server="mail-01",event="opened"}"#;
        let closed = r#"bmfleet_instance_windows_total{server="mail-01",event="closed"}"#;
        i.phase = Phase::PreWindowPass;
        at(&m, &i, 1_000);
        let before = m.encode();
        assert_eq!(value(&before, opened), Some(0.0), "{before}");
        assert_eq!(value(&before, closed), Some(0.0), "{before}");
        // Down and up again between two scrapes.
        i.phase = Phase::ColdSync;
        i.downtime_start_ms = Some(2_000);
        at(&m, &i, 2_000);
        i.phase = Phase::Cutover;
        at(&m, &i, 2_100);
        i.phase = Phase::PostMigration;
        i.downtime_end_ms = Some(2_300);
        at(&m, &i, 2_300);
        let after = m.encode();
        let down = r#"bmfleet_instance_down{server="mail-01"}"#;
        assert_eq!(value(&after, down), Some(0.0), "{after}");
        assert_eq!(value(&after, opened), Some(1.0), "{after}");
        assert_eq!(value(&after, closed), Some(1.0), "{after}");
        assert_eq!(
            value(&after, "bmfleet_downtime_seconds_count"),
            Some(1.0),
            "{after}"
        );
    }
}
