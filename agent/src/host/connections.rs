//! Whether a TCP connection ends on this host: Verify's proof that the answer on the service
//! IP came from this host's own socket (the kernel's table, not a banner the origin could
//! print as well).

use std::net::SocketAddr;

/// The kernel's state of the connection between `local` (an address of this host) and
/// `remote` (the caller's end), if this host holds one: `Established`, `CloseWait`, ….
/// Reads this network namespace's TCP tables (IPv4 and IPv6).
pub fn held(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<String>> {
    let same = |a: SocketAddr, b: SocketAddr| a.port() == b.port() && canonical(a) == canonical(b);
    let mut entries = procfs::net::tcp().map_err(std::io::Error::other)?;
    // A host without IPv6 has no tcp6 table.
    entries.extend(procfs::net::tcp6().unwrap_or_default());
    Ok(entries
        .into_iter()
        .find(|e| same(e.local_address, local) && same(e.remote_address, remote))
        .map(|e| format!("{:?}", e.state)))
}

/// The address without IPv4-mapped IPv6 dressing (a dual-stack socket lists `::ffff:a.b.c.d`).
fn canonical(a: SocketAddr) -> std::net::IpAddr {
    match a.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_made_here_is_found_and_a_foreign_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let (local, remote) = (listener.local_addr().unwrap(), client.local_addr().unwrap());
        assert_eq!(held(local, remote).unwrap().as_deref(), Some("Established"));
        let elsewhere: SocketAddr = format!("127.0.0.2:{}", remote.port()).parse().unwrap();
        assert_eq!(held(local, elsewhere).unwrap(), None);
    }
}
