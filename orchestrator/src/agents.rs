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

/// Clients of every configured agent, by name.
pub struct AgentPool {
    agents: BTreeMap<String, AgentHandle>,
}

impl AgentPool {
    /// Builds (lazily connecting) clients for `entries`, presenting `identity`.
    pub fn new(
        identity: &LocalIdentity,
        entries: &[AgentEntry],
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let config = identity.client_config(Role::Agent)?;
        let mut agents = BTreeMap::new();
        for entry in entries {
            let channel = connect(&entry.address, &entry.name, config.clone(), timeout)?;
            agents.insert(
                entry.name.clone(),
                AgentHandle {
                    name: entry.name.clone(),
                    address: entry.address.clone(),
                    data_address: entry.data_address.clone(),
                    client: AgentClient::new(channel),
                },
            );
        }
        Ok(AgentPool { agents })
    }

    /// Every agent, by name.
    pub fn iter(&self) -> impl Iterator<Item = &AgentHandle> {
        self.agents.values()
    }

    /// One agent by name.
    pub fn get(&self, name: &str) -> Option<&AgentHandle> {
        self.agents.get(name)
    }
}
