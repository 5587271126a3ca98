//! `bmfleet-bench summarize FILE…`: the medians of several `downtime` runs (each file holds
//! one run's output; its last JSON line is read), grouped by instance, profile, landing and
//! churn, as ratios per run (bmfleet against the manual procedure and against the physical
//! floor, both measured in that run), then how each downtime grows with the day's changes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::Value;

/// One bmfleet measurement with the manual run and the floor of the same sitting.
struct Run {
    manual: f64,
    bmfleet: f64,
    floor: f64,
    manual_client: Option<f64>,
    bmfleet_client: Option<f64>,
}

/// What the runs of one row share: instance, profile, landing, path, churn.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    files: u64,
    db_rows: u64,
    db_churn: String,
    day_lands: String,
    db_sync: String,
    /// The churn in millionths (an exact key).
    churn_ppm: u64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn runs_of(files: &[PathBuf]) -> anyhow::Result<BTreeMap<Key, Vec<Run>>> {
    let mut rows: BTreeMap<Key, Vec<Run>> = BTreeMap::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("{}: no JSON line (an unfinished run?)", file.display()))?;
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: the JSON line", file.display()))?;
        let number = |v: &Value, field: &str| {
            v[field]
                .as_f64()
                .with_context(|| format!("{}: no {field}", file.display()))
        };
        let manual = number(&v["manual"], "downtime")?;
        for b in v["bmfleet"].as_array().into_iter().flatten() {
            let key = Key {
                files: v["files"].as_u64().unwrap_or(0),
                db_rows: v["db_rows"].as_u64().unwrap_or(0),
                db_churn: v["db_churn"].as_str().unwrap_or("?").to_string(),
                day_lands: v["day_lands"].as_str().unwrap_or("?").to_string(),
                db_sync: b["db_sync"].as_str().unwrap_or("?").to_string(),
                churn_ppm: (number(&v, "churn_fraction")? * 1e6).round() as u64,
            };
            rows.entry(key).or_default().push(Run {
                manual,
                bmfleet: number(b, "downtime")?,
                floor: number(b, "floor")?,
                manual_client: v["manual"]["client_seen"].as_f64(),
                bmfleet_client: b["client_seen"].as_f64(),
            });
        }
    }
    Ok(rows)
}

/// Prints the table of medians and the growths.
pub fn run(files: &[PathBuf]) -> anyhow::Result<()> {
    if files.is_empty() {
        bail!("name the files that hold the runs' output");
    }
    let rows = runs_of(files)?;
    println!("| instance | profile, landing, path | churn | runs | manual (a) | bmfleet (b) | floor | (b)/(a) | (b)/floor | a client saw, (a) / (b) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (key, runs) in &rows {
        let all = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let clients =
            |f: &dyn Fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f).collect::<Vec<_>>());
        println!(
            "| {} files, {} rows | {}, {}, {} | {:.1} % | {} | {:.2} s | {:.2} s [{}] | {:.2} s | {:.3} | {:.2} | {:.2} / {:.2} s |",
            key.files,
            key.db_rows,
            key.db_churn,
            key.day_lands,
            key.db_sync,
            key.churn_ppm as f64 / 1e4,
            runs.len(),
            median(all(&|r| r.manual)),
            median(all(&|r| r.bmfleet)),
            runs.iter()
                .map(|r| format!("{:.2}", r.bmfleet))
                .collect::<Vec<_>>()
                .join(", "),
            median(all(&|r| r.floor)),
            median(all(&|r| r.bmfleet / r.manual)),
            median(all(&|r| r.bmfleet / r.floor)),
            clients(&|r| r.manual_client),
            clients(&|r| r.bmfleet_client),
        );
    }
    // The same instance, profile, landing and path at a bigger churn than its smallest.
    let mut growths = Vec::new();
    for (key, runs) in &rows {
        let base = rows
            .iter()
            .filter(|(k, _)| {
                Key {
                    churn_ppm: 0,
                    ..(*k).clone()
                } == Key {
                    churn_ppm: 0,
                    ..key.clone()
                }
            })
            .min_by_key(|(k, _)| k.churn_ppm);
        if let Some((base_key, base_runs)) = base.filter(|(k, _)| k.churn_ppm < key.churn_ppm) {
            let m = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
            growths.push(format!(
                "| {}, {}, {} | {:.0}× | {:.2}× | {:.2}× |",
                key.db_churn,
                key.day_lands,
                key.db_sync,
                key.churn_ppm as f64 / base_key.churn_ppm as f64,
                m(runs, &|r| r.bmfleet) / m(base_runs, &|r| r.bmfleet),
                m(runs, &|r| r.manual) / m(base_runs, &|r| r.manual),
            ));
        }
    }
    if !growths.is_empty() {
        println!("\n| profile, landing, path | the day's changes | bmfleet's downtime grows | the manual's |");
        println!("| --- | ---: | ---: | ---: |");
        for g in growths {
            println!("{g}");
        }
    }
    Ok(())
}
