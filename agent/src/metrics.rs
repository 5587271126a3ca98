//! The agent's own Prometheus metrics (`metrics_listen`, OpenMetrics text), with the Prometheus
//! project's own client: what this host did, seen from the host. Operations by kind and
//! outcome (answered from the journal counted apart), their durations and how many run now;
//! data pulled as a target; tunnel requests served or refused as an origin (a refusal is a
//! misconfiguration or someone trying: worth an alert).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    request: String,
    outcome: String,
}

/// How an operation ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and succeeded.
    Ok,
    /// It ran and failed (the reply says why).
    Failed,
    /// A repeated id answered from the journal: nothing ran.
    Replayed,
    /// Refused before running (an id reused for another request, the journal unusable…).
    Refused,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Replayed => "replayed",
            Outcome::Refused => "refused",
        }
    }
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    operations: Family<OutcomeLabels, Counter>,
    durations: Family<KindLabels, Histogram>,
    in_flight: Family<KindLabels, Gauge>,
    pulled_bytes: Counter,
    pulled_files: Counter,
    tunnel: Family<TunnelLabels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let operations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "bmfleet_agent_operations",
            "Operations by kind and outcome (replayed: answered from the journal)",
            operations.clone(),
        );
        let durations = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 16))
        });
        registry.register(
            "bmfleet_agent_operation_duration_seconds",
            "How long the operations that ran took, by kind",
            durations.clone(),
        );
        let in_flight = Family::<KindLabels, Gauge>::default();
        registry.register(
            "bmfleet_agent_operations_in_flight",
            "Operations running now, by kind",
            in_flight.clone(),
        );
        let pulled_bytes = Counter::default();
        registry.register(
            "bmfleet_agent_pulled_bytes",
            "Bytes of the files this agent pulled from origins (as a target)",
            pulled_bytes.clone(),
        );
        let pulled_files = Counter::default();
        registry.register(
            "bmfleet_agent_pulled_files",
            "Entries created or updated by this agent's pulls (as a target)",
            pulled_files.clone(),
        );
        let tunnel = Family::<TunnelLabels, Counter>::default();
        registry.register(
            "bmfleet_agent_tunnel_requests",
            "Data-plane requests by kind and outcome (as an origin): served, failed, refused",
            tunnel.clone(),
        );
        AgentMetrics {
            registry,
            operations,
            durations,
            in_flight,
            pulled_bytes,
            pulled_files,
            tunnel,
        }
    }

    /// An operation of `kind` starts running; the guard ends it.
    pub fn start(self: &Arc<Self>, kind: &str) -> Running {
        let labels = KindLabels { kind: kind.into() };
        self.in_flight.get_or_create(&labels).inc();
        Running {
            metrics: self.clone(),
            kind: kind.into(),
            started: std::time::Instant::now(),
            ended: false,
        }
    }

    /// Counts one operation's outcome (a running one is counted by its [`Running`] guard; use
    /// this for those that did not run: replayed or refused).
    pub fn count(&self, kind: &str, outcome: Outcome) {
        self.operations
            .get_or_create(&OutcomeLabels {
                kind: kind.into(),
                outcome: outcome.label().into(),
            })
            .inc();
    }

    /// Data a pull moved.
    pub fn pulled(&self, files: u64, bytes: u64) {
        self.pulled_files.inc_by(files);
        self.pulled_bytes.inc_by(bytes);
    }

    /// One data-plane request: `request` (rsync, dump, manifest, unknown) and its outcome.
    pub fn tunnel(&self, request: &str, outcome: &str) {
        self.tunnel
            .get_or_create(&TunnelLabels {
                request: request.into(),
                outcome: outcome.into(),
            })
            .inc();
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

/// A running operation: counted in flight until [`Running::end`] (or dropped: an operation
/// abandoned mid-way counts as failed).
pub struct Running {
    metrics: Arc<AgentMetrics>,
    kind: String,
    started: std::time::Instant,
    ended: bool,
}

impl Running {
    /// Ends the operation with its outcome.
    pub fn end(mut self, ok: bool) {
        self.finish(if ok { Outcome::Ok } else { Outcome::Failed });
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        let labels = KindLabels {
            kind: self.kind.clone(),
        };
        self.metrics.in_flight.get_or_create(&labels).dec();
        self.metrics
            .durations
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics.count(&self.kind, outcome);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.finish(Outcome::Failed);
    }
}

/// Serves `/metrics` on `address` (see [`bmfleet_proto::metrics_http::serve`]).
pub fn serve(metrics: Arc<AgentMetrics>, address: SocketAddr) -> std::io::Result<SocketAddr> {
    bmfleet_proto::metrics_http::serve(move || metrics.encode(), address)
}
