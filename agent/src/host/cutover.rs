//! Moving the service IP: the origin releases it, the target adds it, announces it —
//! gratuitous ARP for IPv4, an unsolicited neighbour advertisement for IPv6 — repeated over a
//! period so every neighbour's table follows, and makes it persistent in its network
//! configuration.

use std::net::IpAddr;
use std::time::Duration;

use bmfleet_proto::v1::IpReply;

use crate::command;
use crate::config::AgentConfig;
use crate::host::persistence;

/// A checked `address/prefix` on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIp {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The interface.
    pub interface: String,
}

impl ServiceIp {
    /// Parses `address/prefix` and checks the interface name.
    pub fn parse(address: &str, interface: &str) -> Result<Self, String> {
        let bad = || format!("'{address}' is not an address with its prefix length");
        let (ip, prefix) = address.split_once('/').ok_or_else(bad)?;
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix == 0 || prefix > if ip.is_ipv4() { 32 } else { 128 } {
            return Err(bad());
        }
        let iface_ok = !interface.is_empty()
            && interface.len() <= 15
            && interface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !iface_ok {
            return Err(format!("invalid interface name '{interface}'"));
        }
        Ok(ServiceIp {
            ip,
            prefix,
            interface: interface.to_string(),
        })
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix)
    }
}

fn failed(error: String) -> IpReply {
    IpReply {
        ok: false,
        error,
        ..Default::default()
    }
}

async fn run(argv: &[String]) -> Result<String, String> {
    let r = command::run("network", argv, Duration::from_secs(30)).await;
    if command::succeeded(&r) {
        Ok(r.stdout_tail)
    } else {
        Err(command::failure_summary(&r))
    }
}

/// Whether the interface carries the address now.
async fn present(config: &AgentConfig, ip: &ServiceIp) -> Result<bool, String> {
    let out = run(&[
        config.network.ip.clone(),
        "-o".into(),
        "addr".into(),
        "show".into(),
        "dev".into(),
        ip.interface.clone(),
    ])
    .await?;
    let needle = format!(" {} ", ip.cidr());
    Ok(out.lines().any(|l| format!("{l} ").contains(&needle)))
}

/// The card an empty `interface` means on this host: for a release, the interface that
/// holds `address` (None: no card holds it); for a take, the one with an address of this
/// host's own in its subnet (bmfleet_proto::network).
fn choose_interface(address: &str, interface: &str, take: bool) -> Result<Option<String>, String> {
    if !interface.is_empty() {
        return Ok(Some(interface.to_string()));
    }
    let bad = || format!("'{address}' is not an address with its prefix length");
    let (ip, prefix) = address.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let cards = crate::host::facts::interface_addresses();
    if take {
        return bmfleet_proto::network::service_interface(ip, prefix, &cards).map(Some);
    }
    Ok(bmfleet_proto::network::interface_holding(ip, &cards))
}

/// Removes the service IP (and its persisted configuration). Idempotent; an empty
/// `interface`: whichever card holds it.
pub async fn release(config: &AgentConfig, address: &str, interface: &str) -> IpReply {
    let held_on = match choose_interface(address, interface, false) {
        Ok(card) => card,
        Err(e) => return failed(e),
    };
    let mut reply = IpReply {
        ok: true,
        ..Default::default()
    };
    let Some(interface) = held_on else {
        // No card holds it: only the persisted configuration may be left.
        if let Err(e) = persistence::remove(config) {
            return failed(e);
        }
        tracing::info!(address, "service IP released (no card held it)");
        return reply;
    };
    let ip = match ServiceIp::parse(address, &interface) {
        Ok(ip) => ip,
        Err(e) => return failed(e),
    };
    match present(config, &ip).await {
        Err(e) => return failed(e),
        Ok(true) => {
            let del = [
                config.network.ip.clone(),
                "addr".into(),
                "del".into(),
                ip.cidr(),
                "dev".into(),
                ip.interface.clone(),
            ];
            if let Err(e) = run(&del).await {
                return failed(e);
            }
            reply.changed = true;
        }
        Ok(false) => {}
    }
    if let Err(e) = persistence::remove(config) {
        return failed(e);
    }
    tracing::info!(address = %ip.cidr(), interface = %ip.interface, changed = reply.changed, "service IP released");
    reply
}

/// Adds, announces and persists the service IP. Idempotent; the first announcement is sent
/// before answering, the others follow over the configured period. An empty `interface`:
/// the card with an address of this host's own in the service IP's subnet.
pub async fn take(config: &AgentConfig, address: &str, interface: &str) -> IpReply {
    let interface = match choose_interface(address, interface, true) {
        Ok(card) => card.unwrap_or_default(),
        Err(e) => return failed(e),
    };
    let ip = match ServiceIp::parse(address, &interface) {
        Ok(ip) => ip,
        Err(e) => return failed(e),
    };
    let mut reply = IpReply {
        ok: true,
        ..Default::default()
    };
    match present(config, &ip).await {
        Err(e) => return failed(e),
        Ok(false) => {
            let mut add = vec![
                config.network.ip.clone(),
                "addr".into(),
                "add".into(),
                ip.cidr(),
                "dev".into(),
                ip.interface.clone(),
            ];
            if ip.ip.is_ipv6() {
                add.push("nodad".into());
            }
            if let Err(e) = run(&add).await {
                return failed(e);
            }
            reply.changed = true;
        }
        Ok(true) => {}
    }
    // Kept across a reboot in the host's own network configuration, on this host's card.
    match persistence::write(config, &ip.interface, &ip.cidr()) {
        Ok(Some(file)) => tracing::info!(file = %file.display(), "service IP persisted"),
        Ok(None) => {}
        Err(e) => return failed(format!("the address is up but cannot be persisted: {e}")),
    }
    {
        if let Err(e) = announce(&ip).await {
            return failed(format!("the address is up but was not announced: {e}"));
        }
        let (count, period) = (
            config.network.announce_count,
            config.network.announce_period_ms,
        );
        if count > 1 {
            let ip = ip.clone();
            let gap = Duration::from_millis(period / u64::from(count));
            tokio::spawn(async move {
                for _ in 1..count {
                    tokio::time::sleep(gap).await;
                    if let Err(e) = announce(&ip).await {
                        tracing::warn!(error = %e, "repeated announcement failed");
                    }
                }
            });
        }
    }
    tracing::info!(address = %ip.cidr(), interface = %ip.interface, changed = reply.changed, "service IP taken");
    reply
}

/// One announcement: a gratuitous ARP for IPv4, an unsolicited neighbour advertisement for
/// IPv6. Sent from this process (a packet socket, a raw ICMPv6 socket): no program to start
/// and no reply to wait for on the downtime's critical path.
async fn announce(ip: &ServiceIp) -> Result<(), String> {
    let (ip, interface) = (ip.ip, ip.interface.clone());
    tokio::task::spawn_blocking(move || match ip {
        IpAddr::V4(v4) => announce_v4(v4, &interface),
        IpAddr::V6(v6) => advertise_v6(v6, &interface),
    })
    .await
    .map_err(|e| e.to_string())?
}

/// An ARP announcement (RFC 5227 §2.3, as `arping -U` sends it): a broadcast Ethernet frame
/// holding an ARP request whose sender and target protocol addresses are both `ip`, from
/// `mac`; padded to Ethernet's 60-byte minimum.
pub fn arp_announcement(ip: std::net::Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    // EtherType ARP; hardware Ethernet, protocol IPv4, lengths 6 and 4, operation request.
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    frame.resize(60, 0);
    frame
}

/// Sends one ARP announcement for `ip` on `interface` (a packet socket; the card's own MAC
/// and link broadcast address as the kernel lists them).
fn announce_v4(ip: std::net::Ipv4Addr, interface: &str) -> Result<(), String> {
    use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let err = |what: &str, e: nix::Error| format!("ARP announcement on {interface} ({what}): {e}");
    let (mac, broadcast) = nix::ifaddrs::getifaddrs()
        .map_err(|e| err("listing the cards", e))?
        .filter(|card| card.interface_name == interface)
        .find_map(|card| {
            let mac = card.address?.as_link_addr()?.addr()?;
            let broadcast = *card.broadcast?.as_link_addr()?;
            Some((mac, broadcast))
        })
        .ok_or_else(|| format!("ARP announcement: {interface} has no link-layer address"))?;
    let socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err("socket", e))?;
    sendto(
        socket.as_raw_fd(),
        &arp_announcement(ip, mac),
        &broadcast,
        MsgFlags::empty(),
    )
    .map_err(|e| err("send", e))?;
    Ok(())
}

/// An unsolicited neighbour advertisement (RFC 4861 §7.2.6): ICMPv6 type 136 with the
/// Override flag, the target address and its link-layer address. The kernel fills the checksum.
pub fn neighbour_advertisement(target: std::net::Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut packet = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    packet.extend_from_slice(&target.octets());
    packet.extend_from_slice(&[2, 1]);
    packet.extend_from_slice(&mac);
    packet
}

fn interface_fact(interface: &str, fact: &str) -> Result<String, String> {
    let path = format!("/sys/class/net/{interface}/{fact}");
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{path}: {e}"))
}

/// Sends one unsolicited neighbour advertisement for `target` to all nodes (ff02::1) on
/// `interface`, from `target`, hop limit 255.
fn advertise_v6(target: std::net::Ipv6Addr, interface: &str) -> Result<(), String> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let index: u32 = interface_fact(interface, "ifindex")?
        .parse()
        .map_err(|e| format!("ifindex of {interface}: {e}"))?;
    let mut mac = [0u8; 6];
    let text = interface_fact(interface, "address")?;
    for (byte, hex) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(hex, 16).map_err(|e| format!("address of {interface}: {e}"))?;
    }
    let err = |what: &str, e: std::io::Error| format!("neighbour advertisement ({what}): {e}");
    let socket = Socket::new_raw(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(|e| err("socket", e))?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(|e| err("bind to device", e))?;
    socket
        .set_multicast_hops_v6(255)
        .map_err(|e| err("hop limit", e))?;
    socket
        .set_multicast_if_v6(index)
        .map_err(|e| err("interface", e))?;
    let scope = if target.is_unicast_link_local() {
        index
    } else {
        0
    };
    let source = std::net::SocketAddrV6::new(target, 0, 0, scope);
    socket
        .bind(&SockAddr::from(source))
        .map_err(|e| err("bind to the service IP", e))?;
    let all_nodes = std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        0,
        0,
        index,
    );
    socket
        .send_to(
            &neighbour_advertisement(target, mac),
            &SockAddr::from(all_nodes),
        )
        .map_err(|e| err("send", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_interfaces_are_checked() {
        let ip = ServiceIp::parse("198.18.0.100/24", "eth0").unwrap();
        assert_eq!(ip.cidr(), "198.18.0.100/24");
        assert!(ServiceIp::parse("198.18.0.100", "eth0").is_err());
        assert!(ServiceIp::parse("198.18.0.100/33", "eth0").is_err());
        assert!(ServiceIp::parse("198.18.0.100/24", "eth0; rm -rf /").is_err());
        assert!(ServiceIp::parse("2001:db8::1/64", "eth0").is_ok());
    }

    #[test]
    fn an_arp_announcement_names_the_address_as_sender_and_target() {
        let mac = [2, 0, 0, 0, 0, 9];
        let f = arp_announcement("198.18.0.101".parse().unwrap(), mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06], "EtherType ARP");
        assert_eq!(
            &f[14..22],
            &[0, 1, 8, 0, 6, 4, 0, 1],
            "Ethernet/IPv4 request"
        );
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[28..32], &[198, 18, 0, 101], "sender protocol address");
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[198, 18, 0, 101], "target protocol address");
        assert!(f[42..].iter().all(|b| *b == 0), "padding");
    }

    #[test]
    fn a_neighbour_advertisement_overrides_and_carries_the_mac() {
        let p = neighbour_advertisement("fe80::bf:100".parse().unwrap(), [2, 0, 0, 0, 0, 9]);
        assert_eq!(p.len(), 32);
        assert_eq!(&p[..8], &[136, 0, 0, 0, 0x20, 0, 0, 0]);
        assert_eq!(&p[24..], &[2, 1, 2, 0, 0, 0, 0, 9]);
    }
}
