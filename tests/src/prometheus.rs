//! A real Prometheus (the Debian package) for the observability tests: its configuration,
//! its command line, queries through its HTTP API, and the PromQL expressions the project
//! ships (Grafana dashboard, alert rules).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// A scrape configuration: the orchestrator's `/metrics` (host:port, job `bmfleet`) and the
/// agents' (job `bmfleet-agent`), every `interval_secs`.
pub fn config(orchestrator: &str, agents: &[String], interval_secs: u64) -> String {
    let mut text = format!(
        "global:\n  scrape_interval: {interval_secs}s\n  evaluation_interval: {interval_secs}s\nscrape_configs:\n  - job_name: bmfleet\n    static_configs:\n      - targets: [\"{orchestrator}\"]\n"
    );
    if !agents.is_empty() {
        let quoted: Vec<String> = agents.iter().map(|a| format!("\"{a}\"")).collect();
        text += &format!(
            "  - job_name: bmfleet-agent\n    static_configs:\n      - targets: [{}]\n",
            quoted.join(", ")
        );
    }
    text
}

/// A scrape configuration of the orchestrator alone (see [`config`]) that also evaluates the
/// shipped alert rules (`deploy/prometheus/alerts.yml`) every `interval_secs`.
pub fn alerting_config(orchestrator: &str, interval_secs: u64) -> String {
    format!(
        "rule_files:\n  - \"{}\"\n{}",
        deploy("prometheus/alerts.yml").display(),
        config(orchestrator, &[], interval_secs)
    )
}

/// `prometheus` (`base`: `Command::new("prometheus")`, or the same inside a lab host) with the
/// configuration at `config`, its database under `dir`, serving its API on `listen`; its log
/// goes to `dir/prometheus.log`.
pub fn command(base: Command, config: &Path, dir: &Path, listen: &str) -> Command {
    let mut cmd = base;
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null());
    if let Ok(log) = std::fs::File::create(dir.join("prometheus.log")) {
        cmd.stderr(log);
    }
    cmd
}

/// The series the Prometheus at `address` answers on `api` (`query`, `query_range`) for `expr`
/// and `params`, or why it did not answer.
fn ask(
    address: &str,
    api: &str,
    expr: &str,
    params: &[(&str, String)],
) -> Result<Vec<serde_json::Value>, String> {
    let mut request = ureq::get(&format!("http://{address}/api/v1/{api}")).query("query", expr);
    for (k, v) in params {
        request = request.query(k, v);
    }
    let answer: serde_json::Value = request
        .call()
        .map_err(|e| format!("{expr}: {e}"))?
        .into_json()
        .map_err(|e| format!("{expr}: {e}"))?;
    if answer["status"] != "success" {
        return Err(format!("{expr}: {answer}"));
    }
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The series `expr` returns now from the Prometheus at `address`, or why it did not answer.
pub fn query(address: &str, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    ask(address, "query", expr, &[])
}

/// The series `expr` returns at any step of `step_secs` between the Unix times `start` and
/// `end` (what a Grafana panel or annotation over that span shows), or why Prometheus did
/// not answer.
pub fn query_range(
    address: &str,
    expr: &str,
    start: f64,
    end: f64,
    step_secs: u64,
) -> Result<Vec<serde_json::Value>, String> {
    let params = [
        ("start", format!("{start:.3}")),
        ("end", format!("{end:.3}")),
        ("step", format!("{step_secs}s")),
    ];
    ask(address, "query_range", expr, &params)
}

/// Every `expr` of the Grafana dashboard (panels' targets and annotations).
pub fn dashboard_expressions() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana/bmfleet-dashboard.json"))
        .expect("deploy/grafana/bmfleet-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// Every alert rule as (name, expression).
pub fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yml"))
        .expect("deploy/prometheus/alerts.yml");
    let mut rules = Vec::new();
    let mut name = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert:") {
            name = n.trim().to_string();
        } else if let Some(e) = line.strip_prefix("expr:") {
            rules.push((name.clone(), e.trim().to_string()));
        }
    }
    rules
}
