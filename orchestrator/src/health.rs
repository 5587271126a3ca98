//! The periodic health check: every agent gets a real `Facts` call (a TLS refusal only shows
//! on the first call), and the outcome goes to the state database.

use std::sync::Arc;
use std::time::Duration;

use bmfleet_proto::error_chain::describe_status;
use bmfleet_proto::v1::{FactsReply, FactsRequest};

use crate::agents::{AgentHandle, AgentPool};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::state::{HealthCheck, State};

/// Checks one agent now; `measure_usage` asks it to walk its data dirs.
pub async fn check_agent(
    agent: &AgentHandle,
    measure_usage: bool,
    timeout: Duration,
) -> HealthCheck {
    let mut client = agent.client.clone();
    let mut request = tonic::Request::new(FactsRequest { measure_usage });
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.facts(request)).await {
        Ok(Ok(reply)) => HealthCheck::Up(Box::new(reply.into_inner())),
        Ok(Err(status)) => HealthCheck::Down(describe_status(&status)),
        Err(_) => HealthCheck::Down(format!(
            "no answer from {} within {}s",
            agent.address,
            timeout.as_secs()
        )),
    }
}

/// Keeps the last measured usage of data dirs when a check did not measure it.
fn carry_usage(mut facts: FactsReply, previous: Option<FactsReply>) -> FactsReply {
    let Some(previous) = previous else {
        return facts;
    };
    for dir in facts.data_dirs.iter_mut().filter(|d| !d.usage_measured) {
        if let Some(old) = previous
            .data_dirs
            .iter()
            .find(|o| o.path == dir.path && o.usage_measured)
        {
            dir.used_bytes = old.used_bytes;
            dir.entries = old.entries;
            dir.usage_measured = true;
        }
    }
    facts
}

/// Checks every agent concurrently and records the outcomes; `measure_usage` says which agents
/// walk their data dirs this time. Returns the agents whose usage was measured.
pub async fn check_all(
    pool: &AgentPool,
    metrics: &Metrics,
    state: &State,
    clock: &dyn Clock,
    measure_usage: &(dyn Fn(&str) -> bool + Sync),
    timeout: Duration,
) -> Vec<String> {
    let mut checks = tokio::task::JoinSet::new();
    for agent in pool.handles() {
        let measure = measure_usage(&agent.name);
        checks.spawn(async move {
            let check = check_agent(&agent, measure, timeout).await;
            (agent.name, check, measure)
        });
    }
    let mut measured = Vec::new();
    while let Some(joined) = checks.join_next().await {
        let Ok((name, check, measure)) = joined else {
            continue;
        };
        metrics.agent_up(&name, matches!(check, HealthCheck::Up(_)));
        let check = match check {
            HealthCheck::Up(facts) => {
                if measure {
                    measured.push(name.clone());
                }
                let previous = state.last_facts(&name).ok().flatten();
                HealthCheck::Up(Box::new(carry_usage(*facts, previous)))
            }
            HealthCheck::Down(reason) => {
                tracing::warn!(agent = %name, %reason, "agent down");
                HealthCheck::Down(reason)
            }
        };
        if let Err(e) = state.record_health(&name, &check, clock.now_ms()) {
            tracing::error!(agent = %name, error = %e, "cannot record health");
        }
    }
    measured
}

/// Runs health checks every `interval`, measuring usage every `usage_interval`, until the
/// task is dropped.
pub async fn run(
    pool: Arc<AgentPool>,
    metrics: Arc<Metrics>,
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    usage_interval: Duration,
    timeout: Duration,
) {
    // When each agent's usage was last measured: an agent that was down when its walk was
    // due is walked at its first answer, not an interval later.
    let mut last_usage: std::collections::HashMap<String, i64> = Default::default();
    let usage_ms = i64::try_from(usage_interval.as_millis()).unwrap_or(i64::MAX);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = clock.now_ms();
        let due = |name: &str| last_usage.get(name).is_none_or(|t| now - t >= usage_ms);
        let measured = check_all(&pool, &metrics, &state, clock.as_ref(), &due, timeout).await;
        for name in measured {
            last_usage.insert(name, now);
        }
    }
}
