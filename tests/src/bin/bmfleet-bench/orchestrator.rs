//! `bmfleet-bench orchestrator [--pairs N]`: one orchestrator engine driving N instance pairs
//! through every phase with simulated agents on simulated time (tokio's paused clock), as in the
//! orchestrator's simulation tests. Reports wall time, CPU seconds, peak RSS, and the time to
//! compute `bmctl fleet status` (every instance's state from SQLite, progress and ETA) sampled
//! during the run. Then the latency of the real `bmctl fleet status` (process, mutual TLS,
//! Fleet API) against the real orchestrator serving the same fleet stopped halfway through.
//! Not part of CI; see BENCHMARKS.md.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bmfleet_orchestrator::clock::{Clock, SimulatedClock, SystemClock};
use bmfleet_orchestrator::config::OrchestratorConfig;
use bmfleet_orchestrator::engine::{rules_for, Engine};
use bmfleet_orchestrator::fleet::FleetFile;
use bmfleet_orchestrator::machine::Phase;
use bmfleet_orchestrator::sim::{Script, SimAgents};
use bmfleet_orchestrator::state::State;
use bmfleet_orchestrator::StepRunner;
use bmfleet_proto::identity::Role;

fn fleet_text(n: usize, max_down: u32) -> String {
    let mut text = format!(
        "[fleet]\nname = \"bench\"\nmax_parallel_hot_syncs = 100\nmax_concurrent_downtime = {max_down}\nmin_stagger_secs = 5\ncanary_count = 0\nfailure_budget = 0\ndowntime_budget_secs = 1800\n\
         [[fleet.windows]]\ndays = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\",\"sat\",\"sun\"]\nstart = \"22:00\"\nend = \"05:00\"\ntimezone = \"Europe/Paris\"\n"
    );
    for i in 0..n {
        text += &format!(
            "\n[[instance]]\nname = \"mail-{i:04}\"\norigin = \"origin-{i:04}\"\ntarget = \"target-{i:04}\"\nservice_ip = \"198.{}.{}.{}/8\"\n",
            18 + i / 62_500,
            (i / 250) % 250,
            i % 250 + 1
        );
    }
    text
}

fn rusage() -> (f64, i64) {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            (secs(u.user_time()) + secs(u.system_time()), u.max_rss())
        }
        Err(_) => (0.0, 0),
    }
}

/// Bytes the allocator has handed out and not had back (glibc's `mallinfo2`).
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    unsafe { libc::mallinfo2() }.uordblks
}

/// Milliseconds at the `p` quantile of sorted `samples`.
fn quantile(samples: &[f64], p: f64) -> f64 {
    samples
        .get(((samples.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Runs the fleet halfway (`transitions` of them, simulated time) into a state database,
/// serves it with the real orchestrator (its steps still simulated, now on real time) and
/// times `bmctl fleet status` (table, then JSON) `runs` times each. Returns the samples, ms.
fn bmctl_latency(
    text: &str,
    transitions: u64,
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let fleet = FleetFile::parse(text, "bench.toml")?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("state.db");
    let now = jiff::Timestamp::now().as_millisecond();
    {
        let store = Arc::new(State::open(&db)?);
        store.save_fleet_file(text, &Default::default(), now)?;
        let paused = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()?;
        paused.block_on(async {
            let mut engine = Engine::open(
                fleet.clone(),
                store,
                Arc::new(SimAgents::new(Script::default())),
                Arc::new(SimulatedClock::starting_at(now)),
                rules_for(&fleet),
            )?;
            let (_commands, rx) = tokio::sync::mpsc::unbounded_channel();
            engine.run(rx, Some(transitions)).await?;
            Ok::<_, anyhow::Error>(())
        })?;
    }
    let pki = bmfleet_tests::TestPki::new();
    let (orchestrator, operator) = (
        pki.issue("orchestrator", Role::Orchestrator),
        pki.issue("operator", Role::Operator),
    );
    let config = OrchestratorConfig::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_db = \"{}\"\nhealth_interval_secs = 3600\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            db.display(),
            orchestrator.ca.display(),
            orchestrator.cert.display(),
            orchestrator.key.display()
        ),
        &dir.path().join("orchestrator.toml"),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = runtime.spawn(bmfleet_orchestrator::run_with(
        config,
        listener,
        Arc::new(SystemClock),
        StepRunner::Simulated(SimAgents::new(Script::default())),
        async {
            let _ = stopped.await;
        },
    ));
    let mut samples = (Vec::new(), Vec::new());
    for json in [false, true] {
        for _ in 0..runs {
            let mut bmctl = std::process::Command::new(bmfleet_tests::binary("bmctl"));
            bmctl
                .args(["fleet", "status"])
                .env("BMFLEET_ORCHESTRATOR", &address)
                .env("BMFLEET_CA", &operator.ca)
                .env("BMFLEET_CERT", &operator.cert)
                .env("BMFLEET_KEY", &operator.key);
            if json {
                bmctl.args(["--output", "json"]);
            }
            let timer = Instant::now();
            let out = bmctl.output()?;
            let ms = timer.elapsed().as_secs_f64() * 1000.0;
            if !out.status.success() {
                anyhow::bail!(
                    "bmctl fleet status: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if json {
                let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let listed = status["instances"].as_array().map_or(0, Vec::len);
                anyhow::ensure!(
                    listed == fleet.instances.len(),
                    "bmctl listed {listed} instances"
                );
                samples.1.push(ms);
            } else {
                // The table lists at most 50 instances (those that most need a look) and
                // counts all of them.
                let table = String::from_utf8_lossy(&out.stdout);
                let n = fleet.instances.len();
                anyhow::ensure!(
                    n <= 50 || table.contains(&format!("50 of {n} instances listed")),
                    "bmctl's table does not say it lists 50 of {n}:\n{table}"
                );
                samples.0.push(ms);
            }
        }
    }
    let _ = stop.send(());
    runtime.block_on(served)??;
    samples.0.sort_by(|a, b| a.total_cmp(b));
    samples.1.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

/// Runs the benchmark and prints its report.
pub fn run(pairs: usize, max_down: u32) -> anyhow::Result<()> {
    let fleet = FleetFile::parse(&fleet_text(pairs, max_down), "bench.toml")?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(State::open(&dir.path().join("state.db"))?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let started = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::<f64>::new()));
    let (stop, transitions, span_ms, instances, engine_heap) = runtime.block_on(async {
        let start: i64 = "2026-12-07T12:00:00Z"
            .parse::<jiff::Timestamp>()?
            .as_millisecond();
        let clock = Arc::new(SimulatedClock::starting_at(start));
        let agents = SimAgents::new(Script::default());
        let mut engine = Engine::open(
            fleet.clone(),
            store.clone(),
            Arc::new(agents),
            clock.clone(),
            rules_for(&fleet),
        )?;
        let count = Arc::new(Mutex::new(0u64));
        let sample_every = 500 * (pairs as u64 / 1000).max(1).pow(2);
        let (observed, seen, status_store, status_samples) =
            (fleet.clone(), count.clone(), store.clone(), samples.clone());
        engine.observe(Box::new(move |t| {
            let mut n = seen.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            // Every 500 transitions at 1,000 pairs (40 samples a run), fewer on bigger fleets
            // (the ETA's placement grows with the square of the instances waiting): what
            // `bmctl fleet status` costs the orchestrator.
            if (*n).is_multiple_of(sample_every) {
                let timer = Instant::now();
                let stored: std::collections::HashMap<_, _> = status_store
                    .instances()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let states: Vec<_> = observed
                    .instances
                    .iter()
                    .map(|s| stored.get(&s.name).cloned().unwrap_or_default())
                    .collect();
                let _ = bmfleet_orchestrator::eta::finishes(&observed, &states, t.now_ms);
                status_samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(timer.elapsed().as_secs_f64() * 1000.0);
            }
        }));
        let (_commands, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = engine.run(rx, None).await?;
        let transitions = *count.lock().unwrap_or_else(|p| p.into_inner());
        let instances = engine.instances().to_vec();
        // The orchestrator's own share of the heap: what freeing the engine (its instances,
        // index, queues, observer; the state DB's handle is kept) gives back. The simulated
        // agents (a journal of every operation, as 20,000 agents would keep on their hosts)
        // stay.
        let with_engine = heap_in_use();
        drop(engine);
        let engine_heap = with_engine.saturating_sub(heap_in_use());
        Ok::<_, anyhow::Error>((
            stop,
            transitions,
            clock.now_ms() - start,
            instances,
            engine_heap,
        ))
    })?;
    let wall = started.elapsed().as_secs_f64();
    let (cpu, rss_kib) = rusage();
    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    s.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| quantile(&s, p);
    let done = instances.iter().filter(|i| i.phase == Phase::Done).count();
    println!("pairs                 {pairs}");
    println!("finished              {stop:?}, {done}/{pairs} Done");
    println!("transitions           {transitions}");
    println!(
        "simulated span        {:.1} h",
        span_ms as f64 / 3_600_000.0
    );
    println!("wall time             {wall:.2} s");
    println!("CPU time              {cpu:.2} s");
    println!(
        "peak RSS              {:.1} MiB (the simulated agents' journals included)",
        rss_kib as f64 / 1024.0
    );
    println!(
        "engine's heap         {:.1} MiB at the end of the night (what freeing it gives back)",
        engine_heap as f64 / 1048576.0
    );
    println!(
        "status computation    p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} samples)",
        pct(0.5),
        pct(0.95),
        pct(1.0),
        s.len()
    );
    // Measured after the run above (CPU and RSS are the whole process's, printed first).
    let (table, json) = match bmctl_latency(&fleet_text(pairs, max_down), transitions / 2, 20) {
        Ok(samples) => samples,
        Err(e) => {
            println!("bmctl fleet status    failed: {e:#}");
            (Vec::new(), Vec::new())
        }
    };
    for (what, samples) in [("table", &table), ("--output json", &json)] {
        println!(
            "bmctl fleet status    {what}: p50 {:.0} ms, p95 {:.0} ms ({} runs, halfway through)",
            quantile(samples, 0.5),
            quantile(samples, 0.95),
            samples.len()
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "pairs": pairs, "done": done, "stop": format!("{stop:?}"), "transitions": transitions,
            "wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": rss_kib as f64 / 1024.0,
            "engine_heap_mib": engine_heap as f64 / 1048576.0,
            "status_ms": {"p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)},
            "bmctl_status_ms": {"p50": quantile(&table, 0.5), "p95": quantile(&table, 0.95)},
            "bmctl_status_json_ms": {"p50": quantile(&json, 0.5), "p95": quantile(&json, 0.95)},
        })
    );
    Ok(())
}
