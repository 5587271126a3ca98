//! The conductor: hosts the engine of the applied fleet inside the orchestrator process,
//! resumes it after a restart from the stored fleet file and states, and passes operators'
//! commands to it.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agents::AgentPool;
use crate::clock::Clock;
use crate::engine::{rules_for, AgentPort, Command, Engine};
use crate::fleet::FleetFile;
use crate::state::{AppliedChoices, State};

/// A fleet file as applied: what runs, and why instances were left out.
#[derive(Debug, Clone)]
pub struct AppliedFleet {
    /// The instances that run (re-migrations marked).
    pub fleet: FleetFile,
    /// One sentence per instance left out.
    pub skipped: Vec<String>,
}

/// `fleet` without the skipped instances, the re-migrated ones marked.
fn with_choices(mut fleet: FleetFile, choices: &AppliedChoices) -> FleetFile {
    fleet
        .instances
        .retain(|i| !choices.skipped.contains(&i.name));
    for i in &mut fleet.instances {
        i.remigrate = choices.remigrate.contains(&i.name);
    }
    fleet
}

struct Applied {
    fleet: Arc<FleetFile>,
    snapshot: Arc<crate::engine::Snapshot>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

/// Why a fleet request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConductorError {
    /// The fleet file is invalid (the message names the line and field).
    #[error(transparent)]
    Invalid(#[from] crate::fleet::FleetFileError),
    /// The fleet names agents the orchestrator does not know.
    #[error(
        "the fleet file names agents the orchestrator does not know: {0} (enroll them with \
         `bmctl fleet enroll`, register them with `bmctl fleet agents add`, or list them in its \
         configuration)"
    )]
    UnknownAgents(String),
    /// A fleet is already being migrated.
    #[error(
        "fleet {0} is still being migrated: finish or abort its instances before applying another"
    )]
    Busy(String),
    /// No fleet was applied.
    #[error("no fleet was applied: run `bmctl fleet apply FILE` first")]
    NoFleet,
    /// No such instance.
    #[error("no instance named '{0}' in the applied fleet")]
    NoInstance(String),
    /// The applied fleet's engine has stopped: every instance is finished.
    #[error("the applied fleet has finished: nothing left to command")]
    Finished,
    /// Every instance of the file was migrated already: nothing would run.
    #[error("nothing to migrate: {0}")]
    AllMigrated(String),
    /// `--remigrate` names an instance the file does not have.
    #[error("--remigrate names {0}, which the fleet file does not have")]
    UnknownRemigrate(String),
    /// Storage failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// The engine host.
pub struct Conductor {
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    port: Arc<dyn AgentPort>,
    agents: Arc<AgentPool>,
    applied: Mutex<Option<Applied>>,
    metrics: Arc<crate::metrics::Metrics>,
    receivers: Arc<Vec<crate::notify::Receiver>>,
}

impl Conductor {
    /// A conductor running steps through `port`, for the agents of `pool`.
    pub fn new(
        state: Arc<State>,
        clock: Arc<dyn Clock>,
        port: Arc<dyn AgentPort>,
        pool: Arc<AgentPool>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Conductor {
            state,
            clock,
            port,
            agents: pool,
            applied: Mutex::new(None),
            metrics,
            receivers: Arc::new(Vec::new()),
        }
    }

    /// The receivers (`[[notify]]`) fleet files may name, and ask as window gates.
    pub fn with_receivers(mut self, receivers: Arc<Vec<crate::notify::Receiver>>) -> Self {
        self.receivers = receivers;
        self
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, Option<Applied>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resumes the stored fleet, if any (after an orchestrator restart), with the choices made
    /// when it was applied.
    pub fn resume_stored(&self) -> Result<(), ConductorError> {
        if let Some(text) = self.state.fleet_file()? {
            let fleet = FleetFile::parse(&text, "stored fleet file")?;
            let fleet = with_choices(fleet, &self.state.applied_choices()?);
            tracing::info!(migration = %fleet.policy.name, instances = fleet.instances.len(), "resuming the applied fleet");
            self.start(fleet)?;
        }
        Ok(())
    }

    /// Checks and starts migrating a fleet file. An instance whose target already served (its
    /// last outcome Done or Failed, in whatever earlier apply) is left out and named in
    /// `Applied::skipped`, unless `remigrate` names it.
    pub fn apply(
        &self,
        text: &str,
        file_name: &str,
        remigrate: &[String],
    ) -> Result<AppliedFleet, ConductorError> {
        let fleet = FleetFile::parse(text, file_name)?;
        let names: Vec<String> = self.receivers.iter().map(|r| r.name.clone()).collect();
        fleet.check_receivers(&names, file_name)?;
        let unknown: Vec<String> = fleet
            .instances
            .iter()
            .flat_map(|i| [&i.origin, &i.target])
            .filter(|a| !self.agents.contains(a))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(ConductorError::UnknownAgents(unknown.join(", ")));
        }
        if let Some(name) = remigrate
            .iter()
            .find(|r| !fleet.instances.iter().any(|i| &i.name == *r))
        {
            return Err(ConductorError::UnknownRemigrate(name.clone()));
        }
        if let Some(current) = self.applied().as_ref() {
            if !current.task.is_finished() {
                return Err(ConductorError::Busy(current.fleet.policy.name.clone()));
            }
        }
        let history = self.state.last_outcomes()?;
        let skipped: Vec<(String, String)> = fleet
            .instances
            .iter()
            .filter(|i| !remigrate.contains(&i.name))
            .filter_map(|i| {
                let h = history.iter().find(|h| {
                    h.instance == i.name && (h.outcome == "Done" || h.outcome == "Failed")
                })?;
                Some((
                    i.name.clone(),
                    format!(
                        "{} ({} from {} to {}, migration {}, at {}): its target has served; \
                         `bmctl fleet apply --remigrate {}` migrates it again",
                        i.name,
                        h.outcome,
                        h.origin,
                        h.target,
                        h.migration,
                        jiff::Timestamp::from_millisecond(h.at_ms)
                            .map_or_else(|_| format!("{} ms", h.at_ms), |t| t.to_string()),
                        i.name
                    ),
                ))
            })
            .collect();
        if skipped.len() == fleet.instances.len() {
            let why: Vec<&str> = skipped.iter().map(|(_, why)| why.as_str()).collect();
            return Err(ConductorError::AllMigrated(why.join("; ")));
        }
        let choices = AppliedChoices {
            skipped: skipped.iter().map(|(n, _)| n.clone()).collect(),
            remigrate: remigrate.to_vec(),
        };
        self.state
            .save_fleet_file(text, &choices, self.clock.now_ms())?;
        let fleet = with_choices(fleet, &choices);
        self.start(fleet.clone())?;
        Ok(AppliedFleet {
            fleet,
            skipped: skipped.into_iter().map(|(_, why)| why).collect(),
        })
    }

    fn start(&self, fleet: FleetFile) -> Result<(), ConductorError> {
        let mut engine = Engine::open(
            fleet.clone(),
            self.state.clone(),
            self.port.clone(),
            self.clock.clone(),
            rules_for(&fleet),
        )?;
        let (receivers, gated, clock) = (self.receivers.clone(), fleet.clone(), self.clock.clone());
        engine.set_gate(Arc::new(move |name, spec, window_end_ms| {
            let (receivers, fleet, now) = (receivers.clone(), gated.clone(), clock.now_ms());
            Box::pin(async move {
                match receivers.iter().find(|r| r.name == name) {
                    Some(r) => r.ask_gate(&fleet, &spec, window_end_ms, now).await,
                    None => Err(format!(
                        "no window gate {name} in the orchestrator's configuration"
                    )),
                }
            })
        }));
        let (metrics, observed) = (self.metrics.clone(), fleet.clone());
        engine.observe(Box::new(move |t| {
            metrics.transition(&observed, t.instances, t.index, t.n, t.event, t.now_ms);
            let budget = observed.policy.failure_budget as usize;
            metrics.fleet(t.fleet.paused, budget > 0 && t.index.failed() >= budget);
        }));
        let snapshot = engine.snapshot();
        let (commands, rx) = mpsc::unbounded_channel();
        let name = fleet.policy.name.clone();
        let task = tokio::spawn(async move {
            match engine.run(rx, None).await {
                Ok(stop) => tracing::info!(migration = %name, ?stop, "fleet engine stopped"),
                Err(e) => tracing::error!(migration = %name, error = %e, "fleet engine failed"),
            }
        });
        if let Some(old) = self.applied().replace(Applied {
            fleet: Arc::new(fleet),
            snapshot,
            commands,
            task,
        }) {
            old.task.abort();
        }
        Ok(())
    }

    /// The applied fleet, if any (shared: a fleet of thousands is not copied per reader).
    pub fn fleet(&self) -> Option<Arc<FleetFile>> {
        self.applied().as_ref().map(|a| a.fleet.clone())
    }

    /// Runs `read` on the applied fleet and its engine's snapshot of every instance, without
    /// copying them (None without a fleet).
    pub fn read_states<R>(
        &self,
        read: impl FnOnce(&FleetFile, &[crate::machine::Instance]) -> R,
    ) -> Option<R> {
        let (fleet, snapshot) = {
            let applied = self.applied();
            let applied = applied.as_ref()?;
            (applied.fleet.clone(), applied.snapshot.clone())
        };
        Some(snapshot.read(|states| read(&fleet, states)))
    }

    /// Passes an operator's command to the engine.
    pub fn command(&self, command: Command) -> Result<(), ConductorError> {
        let applied = self.applied();
        let applied = applied.as_ref().ok_or(ConductorError::NoFleet)?;
        let named = match &command {
            Command::Pause(Some(n)) | Command::Resume(Some(n)) | Command::Abort(n) => Some(n),
            _ => None,
        };
        if let Some(n) = named {
            if !applied.fleet.instances.iter().any(|i| i.name == *n) {
                return Err(ConductorError::NoInstance(n.clone()));
            }
        }
        applied
            .commands
            .send(command)
            .map_err(|_| ConductorError::Finished)
    }
}

impl Drop for Conductor {
    fn drop(&mut self) {
        if let Some(a) = self.applied().take() {
            a.task.abort();
        }
    }
}
