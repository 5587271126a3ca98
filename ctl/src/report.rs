//! `bmctl fleet report`: the orchestrator's migration report, rendered as one self-contained
//! HTML file (inline CSS and SVG, no script, printable), Markdown or JSON.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use bmfleet_orchestrator::report::{FleetReport, InstanceReport};
use bmfleet_proto::v1::ReportRequest;
use clap::ValueEnum;

use crate::status::utc;
use crate::Connection;

/// The report's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One self-contained HTML file.
    Html,
    /// Markdown.
    Md,
    /// The orchestrator's report as JSON.
    Json,
}

/// Asks the orchestrator for the report and writes it.
pub async fn report(
    connection: &Connection,
    instances: Vec<String>,
    format: Format,
    output: Option<PathBuf>,
    attach: Option<PathBuf>,
) -> anyhow::Result<()> {
    // Read first: a bad file is refused before anything is asked.
    let attached: std::collections::BTreeMap<String, Vec<String>> = match &attach {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )
        .with_context(|| {
            format!(
                "{}: expected a JSON object of instance names to lists of lines",
                path.display()
            )
        })?,
        None => Default::default(),
    };
    let mut client = connection.client()?;
    let reply = connection
        .call(client.report(ReportRequest { instances }))
        .await?
        .into_inner();
    let mut report: FleetReport = serde_json::from_str(&reply.report_json)
        .context("the orchestrator's report is not one this bmctl reads")?;
    if let Some(unknown) = attached
        .keys()
        .find(|name| !report.instances.iter().any(|i| &i.name == *name))
    {
        anyhow::bail!("the attached checks name {unknown}, which is not in the report");
    }
    for i in &mut report.instances {
        for line in attached.get(&i.name).into_iter().flatten() {
            i.checks.push(format!("checked outside bmfleet: {line}"));
        }
    }
    let text = match format {
        Format::Html => html(&report),
        Format::Md => markdown(&report),
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
    };
    match output {
        Some(path) => {
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write the report to {}", path.display()))?;
            println!("report written to {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// Milliseconds as seconds, to the millisecond.
fn secs(ms: i64) -> String {
    format!("{:.3} s", ms as f64 / 1000.0)
}

/// Bytes, readable.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The downtime against its budget.
fn downtime_text(i: &InstanceReport) -> String {
    if i.downtime_ms == 0 {
        return "none yet".into();
    }
    format!("{} of {} s", secs(i.downtime_ms), i.downtime_budget_secs)
}

/// When the instance's record began and ended (its first and last transitions).
fn span(i: &InstanceReport) -> Option<(i64, i64)> {
    let start = i.phases.first()?.start_unix_ms;
    let end = i
        .phases
        .iter()
        .map(|p| p.start_unix_ms.max(p.end_unix_ms))
        .chain(i.steps.iter().map(|s| s.end_unix_ms))
        .max()
        .unwrap_or(start);
    Some((start, end.max(start)))
}

// ------------------------------------------------------------------------------ Markdown

/// The report as Markdown.
pub fn markdown(r: &FleetReport) -> String {
    let mut out = String::new();
    let t = &r.totals;
    let _ = writeln!(
        out,
        "# Migration report: {}\n\nWritten by {} at {}.\n\n{} instances: {} done, {} rolled back, {} failed, {} other; downtime {} in all, longest {}, {} over budget; {} moved.\n",
        r.migration,
        r.orchestrator,
        utc(r.generated_at_unix_ms),
        t.instances,
        t.done,
        t.rolled_back,
        t.failed,
        t.other,
        secs(t.downtime_ms),
        secs(t.longest_downtime_ms),
        t.over_budget,
        bytes(t.bytes_moved)
    );
    out.push_str("| instance | origin → target | phase | downtime (of budget) | databases | moved |\n| --- | --- | --- | ---: | --- | ---: |\n");
    for i in &r.instances {
        let _ = writeln!(
            out,
            "| {} | {} → {} | {} | {} | {} | {} in {} files |",
            cell(&i.name),
            cell(&i.origin),
            cell(&i.target),
            i.phase,
            downtime_text(i),
            cell(&i.databases),
            bytes(i.bytes_moved),
            i.files_moved
        );
    }
    acts_md(&mut out, "Fleet-wide operator acts", &r.fleet_acts);
    for i in &r.instances {
        let _ = writeln!(
            out,
            "\n## {}\n\n{} → {}, {}; databases: {} ({}).\n",
            i.name, i.origin, i.target, i.phase, i.databases, i.databases_why
        );
        if i.downtime_ms > 0 {
            let _ = writeln!(
                out,
                "Downtime {} → {}: **{}** (budget {} s).\n\n| step | from the stop | takes |\n| --- | ---: | ---: |",
                utc(i.downtime_start_unix_ms),
                utc(i.downtime_end_unix_ms),
                secs(i.downtime_ms),
                i.downtime_budget_secs
            );
            for s in &i.downtime_split {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} |",
                    s.step,
                    secs(s.start_ms),
                    secs(s.ms)
                );
            }
            out.push('\n');
        }
        out.push_str("| phase | from | to |\n| --- | --- | --- |\n");
        for p in &i.phases {
            let end = if p.end_unix_ms == 0 {
                "…".to_string()
            } else {
                utc(p.end_unix_ms)
            };
            let _ = writeln!(out, "| {} | {} | {} |", p.phase, utc(p.start_unix_ms), end);
        }
        out.push_str("\n| step | attempt | started | takes | outcome | changed | detail |\n| --- | ---: | --- | ---: | --- | ---: | --- |\n");
        for s in &i.steps {
            let takes = if s.end_unix_ms > 0 {
                secs(s.end_unix_ms - s.start_unix_ms)
            } else {
                "…".into()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                s.step,
                s.attempt,
                utc(s.start_unix_ms),
                takes,
                s.outcome,
                changed(s.files_changed, s.bytes_changed, s.rounds),
                cell(if s.error.is_empty() {
                    &s.detail
                } else {
                    &s.error
                })
            );
        }
        let _ = writeln!(out, "\nDatabases' gate: {}", or_none(&i.database_gate));
        for c in &i.checks {
            let _ = writeln!(out, "\nCheck: {c}");
        }
        let _ = writeln!(
            out,
            "\nBlueMind post-migration: {}",
            or_none(&i.post_migration)
        );
        if !i.problems.is_empty() {
            out.push_str("\n| problem at | step | attempt | error | resolution |\n| --- | --- | ---: | --- | --- |\n");
            for p in &i.problems {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    utc(p.at_unix_ms),
                    p.step,
                    p.attempt,
                    cell(&p.error),
                    p.resolution
                );
            }
        }
        acts_md(&mut out, "Operator acts", &i.operator_acts);
    }
    out
}

fn acts_md(out: &mut String, title: &str, acts: &[bmfleet_orchestrator::report::OperatorAct]) {
    if acts.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{title}:\n\n| at | who | call | outcome |\n| --- | --- | --- | --- |"
    );
    for a in acts {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            utc(a.at_unix_ms),
            cell(&a.who),
            a.method,
            cell(&a.outcome)
        );
    }
}

/// A table cell's text: no line breaks, no column separators.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn or_none(text: &str) -> &str {
    if text.is_empty() {
        "none recorded"
    } else {
        text
    }
}

fn changed(files: u64, bytes_changed: u64, rounds: u32) -> String {
    if files == 0 && bytes_changed == 0 {
        return String::new();
    }
    let rounds = if rounds > 1 {
        format!(", {rounds} rounds")
    } else {
        String::new()
    };
    format!("{files} files, {}{rounds}", bytes(bytes_changed))
}

// ---------------------------------------------------------------------------------- HTML

/// Text for HTML (element content and quoted attribute values).
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222;max-width:75em}\
h1{font-size:1.5em}h2{font-size:1.2em;border-top:1px solid #999;padding-top:1em;break-before:auto}\
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #bbb;padding:.2em .5em;\
text-align:left;vertical-align:top;font-size:.9em}td.n{text-align:right;white-space:nowrap}\
td.t{white-space:nowrap}\
.done{color:#1a7f37}.bad{color:#b42318}.detail{max-width:40em;word-break:break-word}\
svg text{font-size:11px;font-family:sans-serif}\
@media print{body{margin:0}h2{break-before:page}}";

/// The report as one self-contained HTML page.
pub fn html(r: &FleetReport) -> String {
    let mut out = String::new();
    let t = &r.totals;
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Migration report: {m}</title><style>{STYLE}</style></head><body>\n<h1>Migration report: {m}</h1>\n<p>Written by {o} at {at}.</p>\n<p id=\"totals\">{n} instances: {d} done, {rb} rolled back, {f} failed, {other} other; downtime {dt} in all, longest {long}; {ob} over budget; {moved} moved.</p>\n",
        m = esc(&r.migration),
        o = esc(&r.orchestrator),
        at = utc(r.generated_at_unix_ms),
        n = t.instances,
        d = t.done,
        rb = t.rolled_back,
        f = t.failed,
        other = t.other,
        dt = secs(t.downtime_ms),
        long = secs(t.longest_downtime_ms),
        ob = t.over_budget,
        moved = bytes(t.bytes_moved)
    );
    out.push_str("<h2>The windows</h2>\n");
    out.push_str(&timeline(r));
    out.push_str("<table><tr><th>instance</th><th>origin → target</th><th>phase</th><th>downtime</th><th>budget</th><th>downtime against budget</th><th>databases</th><th>moved</th></tr>\n");
    for i in &r.instances {
        let class = if i.phase == "Done" { "done" } else { "bad" };
        let _ = writeln!(
            out,
            "<tr><td>{name}</td><td>{o} → {t}</td><td class=\"{class}\">{phase}</td><td class=\"n downtime\" id=\"downtime-{name}\">{dt}</td><td class=\"n\">{b} s</td><td>{bar}</td><td>{db}</td><td class=\"n\">{moved} in {files} files</td></tr>",
            name = esc(&i.name),
            o = esc(&i.origin),
            t = esc(&i.target),
            phase = esc(&i.phase),
            dt = if i.downtime_ms > 0 { secs(i.downtime_ms) } else { "none".into() },
            b = i.downtime_budget_secs,
            bar = budget_bar(i),
            db = esc(&i.databases),
            moved = bytes(i.bytes_moved),
            files = i.files_moved
        );
    }
    out.push_str("</table>\n");
    acts_html(&mut out, "Fleet-wide operator acts", &r.fleet_acts);
    for i in &r.instances {
        instance_html(&mut out, i);
    }
    out.push_str("</body></html>\n");
    out
}

/// Every instance's migration on one time axis: its hot phase, its downtime (red), after.
fn timeline(r: &FleetReport) -> String {
    let spans: Vec<(&InstanceReport, (i64, i64))> = r
        .instances
        .iter()
        .filter_map(|i| span(i).map(|s| (i, s)))
        .collect();
    let (Some(start), Some(end)) = (
        spans.iter().map(|(_, s)| s.0).min(),
        spans.iter().map(|(_, s)| s.1).max(),
    ) else {
        return "<p>No instance has started.</p>\n".into();
    };
    let (label_w, width, row_h) = (140.0, 860.0, 22.0);
    let total = (end - start).max(1) as f64;
    let x = |ms: i64| label_w + (ms - start) as f64 / total * (width - label_w - 10.0);
    let height = 30.0 + row_h * spans.len() as f64;
    let mut svg = format!(
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"every instance's migration on one time axis\">\n"
    );
    for k in 0..=5 {
        let at = start + (end - start) * k / 5;
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"0\" x2=\"{x:.1}\" y2=\"{h:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{ty:.1}\" text-anchor=\"{anchor}\">{label}</text>",
            x = x(at),
            anchor = if k == 5 { "end" } else { "middle" },
            h = height - 16.0,
            ty = height - 4.0,
            label = utc(at).get(11..19).unwrap_or_default()
        );
    }
    for (row, (i, (s, e))) in spans.iter().enumerate() {
        let y = 4.0 + row_h * row as f64;
        let _ = writeln!(
            svg,
            "<text x=\"0\" y=\"{ty:.1}\">{name}</text><rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"14\" fill=\"#9ec5e8\"><title>{name}: {from} → {to}</title></rect>",
            ty = y + 11.0,
            name = esc(&i.name),
            x0 = x(*s),
            w = (x(*e) - x(*s)).max(1.0),
            from = utc(*s),
            to = utc(*e)
        );
        if i.downtime_start_unix_ms > 0 {
            let down_end = if i.downtime_end_unix_ms > 0 {
                i.downtime_end_unix_ms
            } else {
                *e
            };
            let _ = writeln!(
                svg,
                "<rect class=\"window\" data-instance=\"{name}\" x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"14\" fill=\"#b42318\"><title>{name}: downtime {dt}</title></rect>",
                name = esc(&i.name),
                x0 = x(i.downtime_start_unix_ms),
                w = (x(down_end) - x(i.downtime_start_unix_ms)).max(2.0),
                dt = secs(down_end - i.downtime_start_unix_ms)
            );
        }
    }
    svg.push_str("</svg>\n<p>Blue: the migration, from its first step to its last; red: its downtime (at least 2 px wide).</p>\n");
    svg
}

/// The downtime as a share of the budget, drawn.
fn budget_bar(i: &InstanceReport) -> String {
    let budget = (i.downtime_budget_secs as f64 * 1000.0).max(1.0);
    let share = i.downtime_ms as f64 / budget;
    let w = (share.min(1.0) * 120.0).max(if i.downtime_ms > 0 { 1.0 } else { 0.0 });
    let fill = if share > 1.0 { "#b42318" } else { "#1a7f37" };
    format!(
        "<svg width=\"124\" height=\"12\" role=\"img\" aria-label=\"{pct:.2} % of the budget\"><rect x=\"0\" y=\"1\" width=\"122\" height=\"10\" fill=\"none\" stroke=\"#999\"/><rect x=\"1\" y=\"2\" width=\"{w:.1}\" height=\"8\" fill=\"{fill}\"/></svg> {pct:.2} %",
        pct = share * 100.0
    )
}

/// The downtime's steps on their own axis, from the stop to the start.
fn split_svg(i: &InstanceReport) -> String {
    let total = i.downtime_ms.max(1) as f64;
    let (label_w, width, row_h) = (130.0, 700.0, 16.0);
    let height = row_h * i.downtime_split.len() as f64 + 4.0;
    let mut svg = format!(
        "<svg width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"the downtime's steps\">"
    );
    for (row, s) in i.downtime_split.iter().enumerate() {
        let y = 2.0 + row_h * row as f64;
        let x0 = label_w + s.start_ms as f64 / total * (width - label_w - 80.0);
        let w = (s.ms as f64 / total * (width - label_w - 80.0)).max(1.0);
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{ty:.1}\">{step}</text><rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"11\" fill=\"#e07b39\"/><text x=\"{tx:.1}\" y=\"{ty:.1}\">{d}</text>",
            ty = y + 10.0,
            step = esc(&s.step),
            tx = x0 + w + 4.0,
            d = secs(s.ms)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn instance_html(out: &mut String, i: &InstanceReport) {
    let _ = writeln!(
        out,
        "<h2 id=\"instance-{name}\">{name}</h2>\n<p>{o} → {t}, <b>{phase}</b>; databases: {db} ({why}).</p>",
        name = esc(&i.name),
        o = esc(&i.origin),
        t = esc(&i.target),
        phase = esc(&i.phase),
        db = esc(&i.databases),
        why = esc(&i.databases_why)
    );
    if i.downtime_ms > 0 {
        let _ = writeln!(
            out,
            "<p>Downtime {} → {}: <b>{}</b> (budget {} s).</p>",
            utc(i.downtime_start_unix_ms),
            utc(i.downtime_end_unix_ms),
            secs(i.downtime_ms),
            i.downtime_budget_secs
        );
        out.push_str(&split_svg(i));
    }
    out.push_str("<table><tr><th>phase</th><th>from</th><th>to</th><th>takes</th></tr>\n");
    for p in &i.phases {
        let (to, takes) = if p.end_unix_ms > 0 {
            (utc(p.end_unix_ms), secs(p.end_unix_ms - p.start_unix_ms))
        } else {
            ("…".into(), String::new())
        };
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{to}</td><td class=\"n\">{takes}</td></tr>",
            esc(&p.phase),
            utc(p.start_unix_ms)
        );
    }
    out.push_str("</table>\n<table><tr><th>step</th><th>attempt</th><th>started</th><th>takes</th><th>outcome</th><th>changed</th><th>detail</th></tr>\n");
    for s in &i.steps {
        let takes = if s.end_unix_ms > 0 {
            secs(s.end_unix_ms - s.start_unix_ms)
        } else {
            "…".into()
        };
        let class = if s.outcome == "failed" { "bad" } else { "" };
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"t\">{}</td><td class=\"n\">{takes}</td><td class=\"{class}\">{}</td><td class=\"n\">{}</td><td class=\"detail\">{}</td></tr>",
            esc(&s.step),
            s.attempt,
            utc(s.start_unix_ms),
            esc(&s.outcome),
            changed(s.files_changed, s.bytes_changed, s.rounds),
            esc(if s.error.is_empty() { &s.detail } else { &s.error })
        );
    }
    out.push_str("</table>\n<dl>");
    let _ = write!(
        out,
        "<dt>The databases' gate</dt><dd>{}</dd>",
        esc(or_none(&i.database_gate))
    );
    for c in &i.checks {
        let _ = write!(out, "<dt>Check</dt><dd class=\"check\">{}</dd>", esc(c));
    }
    let _ = writeln!(
        out,
        "<dt>BlueMind post-migration</dt><dd>{}</dd></dl>",
        esc(or_none(&i.post_migration))
    );
    if !i.problems.is_empty() {
        out.push_str("<table><tr><th>problem at</th><th>step</th><th>attempt</th><th>error</th><th>resolution</th></tr>\n");
        for p in &i.problems {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"detail\">{}</td><td>{}</td></tr>",
                utc(p.at_unix_ms),
                esc(&p.step),
                p.attempt,
                esc(&p.error),
                esc(&p.resolution)
            );
        }
        out.push_str("</table>\n");
    }
    acts_html(out, "Operator acts", &i.operator_acts);
}

fn acts_html(out: &mut String, title: &str, acts: &[bmfleet_orchestrator::report::OperatorAct]) {
    if acts.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "<p>{title}:</p><table><tr><th>at</th><th>who</th><th>call</th><th>outcome</th></tr>"
    );
    for a in acts {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"detail\">{}</td></tr>",
            utc(a.at_unix_ms),
            esc(&a.who),
            esc(&a.method),
            esc(&a.outcome)
        );
    }
    out.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmfleet_orchestrator::report::{PhaseSpan, StepShare, Totals};

    fn sample() -> FleetReport {
        let instance = InstanceReport {
            name: "mail-<1>".into(),
            origin: "origin-1".into(),
            target: "target-1".into(),
            phase: "Done".into(),
            downtime_start_unix_ms: 1_000_000,
            downtime_end_unix_ms: 1_000_412,
            downtime_ms: 412,
            downtime_budget_secs: 900,
            phases: vec![PhaseSpan {
                phase: "HotSync".into(),
                start_unix_ms: 900_000,
                end_unix_ms: 1_000_000,
            }],
            downtime_split: vec![StepShare {
                step: "databases".into(),
                start_ms: 30,
                ms: 200,
            }],
            checks: vec!["equal & verified".into()],
            ..InstanceReport::default()
        };
        FleetReport {
            migration: "night-1".into(),
            orchestrator: "orch".into(),
            generated_at_unix_ms: 1_100_000,
            totals: Totals {
                instances: 1,
                done: 1,
                downtime_ms: 412,
                longest_downtime_ms: 412,
                ..Totals::default()
            },
            instances: vec![instance],
            fleet_acts: Vec::new(),
        }
    }

    #[test]
    fn the_html_is_self_contained_escaped_and_shows_each_downtime() {
        let page = html(&sample());
        assert!(page.contains("id=\"downtime-mail-&lt;1&gt;\">0.412 s</td>"));
        assert!(page.contains("equal &amp; verified"));
        assert!(!page.contains("mail-<1>"), "a name is escaped everywhere");
        assert!(page.contains("<svg id=\"timeline\""));
        assert!(page.contains("class=\"window\""));
        for outside in ["<script", "src=", "href=", "@import", "url("] {
            assert!(
                !page.contains(outside),
                "{outside} in a self-contained page"
            );
        }
    }

    #[test]
    fn the_markdown_has_the_summary_and_the_downtime_split() {
        let md = markdown(&sample());
        assert!(md.contains("| mail-<1> | origin-1 → target-1 | Done | 0.412 s of 900 s |"));
        assert!(md.contains("| databases | 0.030 s | 0.200 s |"));
    }
}
