//! Simulated agents: every step of every instance with scripted durations, pass sizes and
//! failures, on tokio's clock (paused in tests, so a fleet of hundreds runs in seconds). Like
//! real agents they run each operation id once and answer repeats from their journal, even
//! while the first call still runs.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::engine::{AgentPort, Job, StepOutput, StepResult};
use crate::machine::{PassStats, Step};

/// When a simulated step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Every attempt fails.
    Always,
    /// The first attempt fails, the next succeed.
    Once,
    /// Never answers (a stuck host): the step's deadline must act.
    Hang,
}

/// What the simulated agents do.
#[derive(Debug, Clone)]
pub struct Script {
    /// Duration of each step, ms (sync steps: see `pass_ms`).
    pub step_ms: HashMap<Step, u64>,
    /// Files changed by the first hot pass; each later pass changes a tenth of the previous.
    pub first_pass_files: u64,
    /// Bytes per changed file.
    pub bytes_per_file: u64,
    /// Scan time of a pass, ms.
    pub scan_ms: u64,
    /// Transfer time per changed file, ms.
    pub ms_per_file: f64,
    /// Injected failures by (instance, step).
    pub failures: HashMap<(String, Step), Failure>,
    /// Instances whose mail pours in as fast as passes copy it: every pass changes as many
    /// files as the first, so they never converge.
    pub churning: HashSet<String>,
    /// Rounds every pre-window pass reports (0: the field left unset, as a pass of one).
    pub pre_window_rounds: u32,
}

impl Default for Script {
    fn default() -> Self {
        let step_ms = [
            (Step::Preflight, 2_000),
            (Step::StopOrigin, 20_000),
            (Step::StopTarget, 5_000),
            (Step::Databases, 120_000),
            (Step::Config, 3_000),
            (Step::OriginReleaseIp, 500),
            (Step::TargetTakeIp, 2_000),
            (Step::StartTarget, 40_000),
            (Step::PostMigration, 30_000),
            (Step::Verify, 20_000),
        ]
        .into_iter()
        .collect();
        Script {
            step_ms,
            first_pass_files: 200_000,
            bytes_per_file: 50_000,
            scan_ms: 4_000,
            ms_per_file: 2.0,
            failures: HashMap::new(),
            churning: HashSet::new(),
            pre_window_rounds: 0,
        }
    }
}

/// The simulated agents of a whole fleet (cheap to clone: clones share the hosts).
#[derive(Clone)]
pub struct SimAgents {
    inner: Arc<Hosts>,
}

struct Hosts {
    script: Script,
    operations: Mutex<HashMap<String, Arc<OnceCell<StepResult>>>>,
    passes: Mutex<HashMap<String, u32>>,
    executed: Mutex<Vec<String>>,
    limits: Mutex<Vec<(Step, u32)>>,
    journals: Mutex<Vec<JournalOrigins>>,
}

/// What a sync step was told to count the origin's change journal from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalOrigins {
    /// The step's operation.
    pub operation_id: String,
    /// The final pass: the pass whose start the journal counts from.
    pub full_pass_operation: Option<String>,
    /// A live pass: the last good pass it carries from.
    pub carry_operation: Option<String>,
}

impl SimAgents {
    /// Agents following `script`.
    pub fn new(script: Script) -> Self {
        SimAgents {
            inner: Arc::new(Hosts {
                script,
                operations: Mutex::new(HashMap::new()),
                passes: Mutex::new(HashMap::new()),
                executed: Mutex::new(Vec::new()),
                limits: Mutex::new(Vec::new()),
                journals: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Every operation id that actually ran (not answered from the journal), in order.
    pub fn executed(&self) -> Vec<String> {
        self.inner
            .executed
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// What every sync step that ran counted the origin's journal from, in order.
    pub fn journal_origins(&self) -> Vec<JournalOrigins> {
        self.inner
            .journals
            .lock()
            .map(|j| j.clone())
            .unwrap_or_default()
    }

    /// The bandwidth limit (KiB/s, 0: none) of every sync step that ran, in order.
    pub fn bandwidth_limits(&self) -> Vec<(Step, u32)> {
        self.inner
            .limits
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

impl Hosts {
    fn pass(&self, job: &Job) -> (u64, PassStats) {
        let s = &self.script;
        let n = {
            let mut passes = self.passes.lock().unwrap_or_else(|p| p.into_inner());
            let n = passes.entry(job.instance.name.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let files = if s.churning.contains(&job.instance.name) {
            s.first_pass_files
        } else {
            s.first_pass_files / 10u64.pow(n.saturating_sub(1).min(9))
        };
        let transfer = (files as f64 * s.ms_per_file) as u64;
        let stats = PassStats {
            files_scanned: s.first_pass_files * 2,
            files_changed: files,
            bytes_changed: files * s.bytes_per_file,
            scan_ms: s.scan_ms,
            elapsed_ms: s.scan_ms + transfer,
            ..Default::default()
        };
        (stats.elapsed_ms, stats)
    }

    async fn execute(&self, job: Job) -> StepResult {
        if let Ok(mut e) = self.executed.lock() {
            e.push(job.operation_id.clone());
        }
        let failure = self
            .script
            .failures
            .get(&(job.instance.name.clone(), job.step))
            .copied();
        let (ms, stats) = match job.step {
            Step::HotPass | Step::PreWindowPass | Step::FinalPass => {
                if let Ok(mut l) = self.limits.lock() {
                    l.push((job.step, job.bwlimit_kib));
                }
                if let Ok(mut j) = self.journals.lock() {
                    j.push(JournalOrigins {
                        operation_id: job.operation_id.clone(),
                        full_pass_operation: job.full_pass_operation.clone(),
                        carry_operation: job.carry_operation.clone(),
                    });
                }
                let (ms, mut stats) = self.pass(&job);
                if job.step == Step::PreWindowPass {
                    stats.rounds = self.script.pre_window_rounds;
                }
                (ms, Some(stats))
            }
            step => (
                self.script.step_ms.get(&step).copied().unwrap_or(1_000),
                None,
            ),
        };
        match failure {
            Some(Failure::Hang) => std::future::pending::<()>().await,
            Some(Failure::Always) => {
                tokio::time::sleep(Duration::from_millis(ms / 2)).await;
                return Err(format!("simulated failure of {}", job.step.as_str()).into());
            }
            Some(Failure::Once) if job.attempt == 1 => {
                tokio::time::sleep(Duration::from_millis(ms / 2)).await;
                return Err(format!("simulated transient failure of {}", job.step.as_str()).into());
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
        // A simulated pair streams its databases when the fleet file asks for it.
        let databases = (job.step == Step::Preflight).then(|| {
            let stream = job.instance.db_sync == crate::fleet::DbSync::Stream;
            crate::machine::DbPlan {
                stream,
                logical: false,
                why: if stream {
                    "standby (simulated)".into()
                } else {
                    "dump and restore (simulated)".into()
                },
            }
        });
        Ok(StepOutput {
            stats,
            databases,
            ..StepOutput::default()
        })
    }
}

impl AgentPort for SimAgents {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = StepResult> + Send>> {
        let cell = {
            let mut ops = self
                .inner
                .operations
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            ops.entry(job.operation_id.clone()).or_default().clone()
        };
        let hosts = self.inner.clone();
        // The operation runs on the "host" whether or not the caller waits for it, as a real
        // agent's would; a repeated id waits for (or reads) the same result.
        let run =
            tokio::spawn(async move { cell.get_or_init(|| hosts.execute(job)).await.clone() });
        Box::pin(async move {
            run.await
                .unwrap_or_else(|e| Err(format!("simulated agent: {e}").into()))
        })
    }
}
