//! Which card each side of an instance uses for the service IP. The fleet file may name
//! them (`interface` for both, `origin_interface` / `target_interface` per side); otherwise
//! the origin's is the card that holds the service IP and the target's the one with an
//! address of its own in the service IP's subnet (bmfleet_proto::network). Read from each
//! agent's facts by the preflight and `bmctl fleet plan`, which refuse a missing or an
//! ambiguous card; the agents decide the same way when asked with no name.

use bmfleet_proto::v1::FactsReply;

use crate::fleet::InstanceSpec;

fn cards(facts: &FactsReply) -> Vec<(String, Vec<String>)> {
    facts
        .interface_addresses
        .iter()
        .map(|i| (i.name.clone(), i.addresses.clone()))
        .collect()
}

/// The origin's card: the one named, if the origin has it; else the one holding the
/// service IP.
pub fn origin_card(spec: &InstanceSpec, origin: &FactsReply) -> Result<String, String> {
    if let Some(name) = &spec.origin_interface {
        return named(name, origin, "origin");
    }
    bmfleet_proto::network::interface_holding(spec.service_ip, &cards(origin)).ok_or_else(|| {
        format!(
            "no card of the origin {} holds the service IP {}: name it with origin_interface in the fleet file",
            origin.agent_name, spec.service_ip
        )
    })
}

/// The target's card: the one named, if the target has it; else the one with an address of
/// the target's own in the service IP's subnet.
pub fn target_card(spec: &InstanceSpec, target: &FactsReply) -> Result<String, String> {
    if let Some(name) = &spec.target_interface {
        return named(name, target, "target");
    }
    bmfleet_proto::network::service_interface(spec.service_ip, spec.prefix, &cards(target))
        .map_err(|e| format!("the target {}: {e} (target_interface)", target.agent_name))
}

fn named(name: &str, facts: &FactsReply, side: &str) -> Result<String, String> {
    if facts.interfaces.iter().any(|i| i == name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "the {side} {} has no interface {name} for the service IP (it has {}): set {side}_interface in the fleet file",
            facts.agent_name,
            facts.interfaces.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bmfleet_proto::v1::InterfaceFact;

    fn host(name: &str, cards: &[(&str, &[&str])]) -> FactsReply {
        FactsReply {
            agent_name: name.into(),
            interfaces: cards.iter().map(|(n, _)| n.to_string()).collect(),
            interface_addresses: cards
                .iter()
                .map(|(n, a)| InterfaceFact {
                    name: n.to_string(),
                    addresses: a.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The fleet tests' one instance (service IP 198.18.0.101/24) with `text` added.
    fn spec(text: &str) -> InstanceSpec {
        let file = format!("{}{text}", crate::fleet::tests::BASE);
        crate::fleet::FleetFile::parse(&file, "fleet.toml")
            .unwrap()
            .instances
            .remove(0)
    }

    #[test]
    fn each_side_finds_its_own_card_or_takes_the_named_one() {
        let origin = host(
            "o",
            &[
                ("lo", &["127.0.0.1/8"]),
                ("eth0", &["198.18.0.2/24", "198.18.0.101/24"]),
            ],
        );
        let target = host(
            "t",
            &[("lo", &["127.0.0.1/8"]), ("ens18", &["198.18.0.3/24"])],
        );
        let found = spec("");
        assert_eq!(origin_card(&found, &origin).unwrap(), "eth0");
        assert_eq!(target_card(&found, &target).unwrap(), "ens18");
        // `interface` names both sides: the target has no eth0.
        let both = spec("interface = \"eth0\"\n");
        assert_eq!(origin_card(&both, &origin).unwrap(), "eth0");
        let refused = target_card(&both, &target).unwrap_err();
        assert!(
            refused.contains("has no interface eth0") && refused.contains("ens18"),
            "{refused}"
        );
        // Per side.
        let per_side = spec("interface = \"eth0\"\ntarget_interface = \"ens18\"\n");
        assert_eq!(target_card(&per_side, &target).unwrap(), "ens18");
        // Ambiguous: two cards in the subnet.
        let two = host(
            "t",
            &[("ens18", &["198.18.0.3/24"]), ("ens19", &["198.18.0.4/24"])],
        );
        let refused = target_card(&found, &two).unwrap_err();
        assert!(refused.contains("ens18, ens19"), "{refused}");
        // The origin holds the IP nowhere.
        let bare = host("o", &[("eth0", &["198.18.0.2/24"])]);
        assert!(origin_card(&found, &bare)
            .unwrap_err()
            .contains("holds the service IP"));
    }
}
