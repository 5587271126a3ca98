//! Clients of every agent: one long-lived mutual-TLS channel per agent, accepting only a
//! server whose certificate names that agent with the agent role.

use std::collections::BTreeMap;
use std::time::Duration;

use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{connect, LocalIdentity, TlsError};
use bmfleet_proto::v1::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::config::AgentEntry;

/// One agent's client.
#[derive(Clone)]
pub struct AgentHandle {
    /// The agent's fleet name.
    pub name: String,
    /// Where it listens.
    pub address: String,
    /// Where its data plane listens, if it serves pulls.
    pub data_address: Option<String>,
    /// The gRPC client (cheap to clone; shares the connection).
    pub client: AgentClient<Channel>,
}

/// Clients of every agent, by name: those of the configuration file and those registered at
/// run time (`bmctl fleet agents add`, an enrollment). Cheap to read from many tasks.
pub struct AgentPool {
    config: std::sync::Arc<rustls::ClientConfig>,
    timeout: Duration,
    agents: std::sync::RwLock<BTreeMap<String, AgentHandle>>,
}

impl AgentPool {
    /// Builds (lazily connecting) clients for `entries`, presenting `identity`.
    pub fn new(
        identity: &LocalIdentity,
        entries: &[AgentEntry],
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let pool = AgentPool {
            config: identity.client_config(Role::Agent)?,
            timeout,
            agents: Default::default(),
        };
        for entry in entries {
            pool.insert(entry)?;
        }
        Ok(pool)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, AgentHandle>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, AgentHandle>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an agent, or replaces the client of one with that name (a new address).
    pub fn insert(&self, entry: &AgentEntry) -> Result<(), TlsError> {
        let channel = connect(
            &entry.address,
            &entry.name,
            self.config.clone(),
            self.timeout,
        )?;
        self.write().insert(
            entry.name.clone(),
            AgentHandle {
                name: entry.name.clone(),
                address: entry.address.clone(),
                data_address: entry.data_address.clone(),
                client: AgentClient::new(channel),
            },
        );
        Ok(())
    }

    /// Forgets an agent; true when it was known.
    pub fn remove(&self, name: &str) -> bool {
        self.write().remove(name).is_some()
    }

    /// Every agent now, by name.
    pub fn handles(&self) -> Vec<AgentHandle> {
        self.read().values().cloned().collect()
    }

    /// Whether an agent of that name is known.
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// One agent by name.
    pub fn get(&self, name: &str) -> Option<AgentHandle> {
        self.read().get(name).cloned()
    }
}
