//! Which card of a host the service IP belongs on, decided the same way by the agent (when
//! the fleet file names none), the preflight and `bmctl fleet plan`: the one interface
//! holding an address of the host's own in the service IP's subnet. Hosts of a distribution
//! change name their cards differently (`eth0` on the old release, `ens18` on the new one).

use std::net::IpAddr;

/// Whether `a` lies in `net`/`prefix`.
pub fn in_subnet(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let (a, net, bits) = match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u128::from(u32::from(a)), u128::from(u32::from(n)), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        _ => return false,
    };
    let prefix = u32::from(prefix).min(bits);
    if prefix == 0 {
        return true;
    }
    let shift = bits - prefix;
    (a >> shift) == (net >> shift)
}

/// The interface among `interfaces` (name, its addresses as "address/prefix") that holds
/// `ip` itself, if any: where a service IP is to be released from.
pub fn interface_holding(ip: IpAddr, interfaces: &[(String, Vec<String>)]) -> Option<String> {
    interfaces
        .iter()
        .find(|(_, addresses)| {
            addresses.iter().any(|cidr| {
                cidr.split('/')
                    .next()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    == Some(ip)
            })
        })
        .map(|(name, _)| name.clone())
}

/// The interface the service IP `ip`/`prefix` belongs on among `interfaces` (name, its
/// addresses as "address/prefix"): the one with an address other than the service IP in that
/// subnet. An error names the candidates when there are none or several.
pub fn service_interface(
    ip: IpAddr,
    prefix: u8,
    interfaces: &[(String, Vec<String>)],
) -> Result<String, String> {
    let candidates: Vec<&String> = interfaces
        .iter()
        .filter(|(_, addresses)| {
            addresses.iter().any(|cidr| {
                let text = cidr.split('/').next().unwrap_or_default();
                text.parse::<IpAddr>()
                    .is_ok_and(|own| own != ip && in_subnet(own, ip, prefix))
            })
        })
        .map(|(name, _)| name)
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "no interface has an address in {ip}/{prefix}'s subnet (interfaces: {}): name it in the fleet file",
            interfaces
                .iter()
                .map(|(n, a)| format!("{n} {}", a.join(" ")))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        several => Err(format!(
            "several interfaces have an address in {ip}/{prefix}'s subnet ({}): name one in the fleet file",
            several.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cards(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        list.iter()
            .map(|(n, a)| (n.to_string(), a.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn the_card_with_an_own_address_in_the_subnet_is_chosen() {
        let ip: IpAddr = "198.18.0.101".parse().unwrap();
        let hosts = cards(&[
            ("lo", &["127.0.0.1/8", "::1/128"]),
            ("ens18", &["198.18.0.7/24", "fe80::1/64"]),
            ("ens19", &["198.19.0.7/24"]),
        ]);
        assert_eq!(service_interface(ip, 24, &hosts).unwrap(), "ens18");
        assert_eq!(interface_holding(ip, &hosts), None);
        // The service IP itself is not the host's own address.
        let only_service = cards(&[("eth0", &["198.18.0.101/24"]), ("eth1", &["198.18.1.1/24"])]);
        assert_eq!(
            interface_holding(ip, &only_service).as_deref(),
            Some("eth0")
        );
        assert!(service_interface(ip, 24, &only_service)
            .unwrap_err()
            .contains("no interface"));
        let two = cards(&[("eth0", &["198.18.0.2/24"]), ("br0", &["198.18.0.3/24"])]);
        let err = service_interface(ip, 24, &two).unwrap_err();
        assert!(err.contains("eth0, br0"), "{err}");
    }

    #[test]
    fn subnets_are_compared_by_prefix_and_family() {
        let a: IpAddr = "198.18.1.5".parse().unwrap();
        let net: IpAddr = "198.18.0.0".parse().unwrap();
        assert!(in_subnet(a, net, 15));
        assert!(!in_subnet(a, net, 24));
        assert!(!in_subnet("2001:db8::1".parse().unwrap(), net, 0));
        assert!(in_subnet(
            "fe80::2".parse().unwrap(),
            "fe80::1".parse().unwrap(),
            64
        ));
    }
}
