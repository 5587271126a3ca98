//! Bounded listeners: how many connections a listener holds at once, in all and per peer
//! address, checked as each TCP connection is accepted (before any handshake), so a flood of
//! idle connections costs its sender its own slots, not every fd of the process.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listener's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once, in all.
    pub max_connections: usize,
    /// Connections held at once from one peer address.
    pub max_per_peer: usize,
}

impl Limits {
    /// The Agent API, the data plane and the Fleet API: room for a fleet's worth of callers.
    pub const API: Limits = Limits {
        max_connections: 256,
        max_per_peer: 32,
    };
    /// rsync and pg_dump children an origin runs at once, in all and per grant.
    pub const CHILDREN: Limits = Limits {
        max_connections: 16,
        max_per_peer: 4,
    };
    /// Replication connections an origin relays to its PostgreSQL at once, in all and per
    /// grant: a subscriber opens one per database and its table-sync workers more (the
    /// replication role's own connection limit is 8).
    pub const RELAYS: Limits = Limits {
        max_connections: 32,
        max_per_peer: 8,
    };
}

/// Counts a listener's connections (or any holder's places, keyed by `K`: a peer address, a
/// grant).
#[derive(Clone)]
pub struct Admission<K: Hash + Eq + Clone = IpAddr> {
    limits: Limits,
    held: Arc<Mutex<Held<K>>>,
    /// Peers admitted outside the total (each still within its own maximum): whatever
    /// strangers hold, they find a place.
    reserved: Arc<Vec<K>>,
}

struct Held<K> {
    total: usize,
    per_peer: HashMap<K, usize>,
}

impl<K> Default for Held<K> {
    fn default() -> Self {
        Held {
            total: 0,
            per_peer: HashMap::new(),
        }
    }
}

/// One admitted connection's place; released when dropped.
pub struct Ticket<K: Hash + Eq + Clone = IpAddr> {
    peer: K,
    held: Arc<Mutex<Held<K>>>,
    /// It counts in the total (not a reserved peer's).
    counted: bool,
}

impl<K: Hash + Eq + Clone> Drop for Ticket<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if self.counted {
            held.total = held.total.saturating_sub(1);
        }
        if let Some(n) = held.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The listener holds its maximum.
    #[error("the listener holds its maximum of {0} connections")]
    Full(usize),
    /// This peer holds its maximum.
    #[error("this peer holds its maximum of {0} connections")]
    PeerFull(usize),
}

impl<K: Hash + Eq + Clone> Admission<K> {
    /// An empty listener with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self::reserving(limits, Vec::new())
    }

    /// As [`Admission::new`], with `reserved` peers admitted outside the total.
    pub fn reserving(limits: Limits, reserved: Vec<K>) -> Self {
        Admission {
            limits,
            held: Arc::default(),
            reserved: Arc::new(reserved),
        }
    }

    /// A place for one more connection from `peer`, if the limits allow it.
    pub fn admit(&self, peer: K) -> Result<Ticket<K>, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let counted = !self.reserved.contains(&peer);
        if counted && held.total >= self.limits.max_connections {
            return Err(Refused::Full(self.limits.max_connections));
        }
        let from_peer = held.per_peer.entry(peer.clone()).or_default();
        if *from_peer >= self.limits.max_per_peer {
            return Err(Refused::PeerFull(self.limits.max_per_peer));
        }
        *from_peer += 1;
        if counted {
            held.total += 1;
        }
        Ok(Ticket {
            peer,
            held: self.held.clone(),
            counted,
        })
    }
}

/// A connection holding its ticket, and (optionally) closing itself at a deadline.
pub struct Admitted<S> {
    inner: S,
    _ticket: Ticket,
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Admitted<S> {
    /// `inner`, holding `ticket` for as long as it lives.
    pub fn new(inner: S, ticket: Ticket) -> Self {
        Admitted {
            inner,
            _ticket: ticket,
            expiry: None,
        }
    }

    /// Ends the connection after `lifetime` (reads and writes fail from then on).
    pub fn expire_after(mut self, lifetime: Duration) -> Self {
        self.expiry = Some(Box::pin(tokio::time::sleep(lifetime)));
        self
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expiry
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

fn expired_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection lifetime reached")
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_in_all_and_per_peer_and_come_back() {
        let a = Admission::new(Limits {
            max_connections: 3,
            max_per_peer: 2,
        });
        let (x, y): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).err(), Some(Refused::PeerFull(2)));
        let _t3 = a.admit(y).unwrap();
        assert_eq!(a.admit(y).err(), Some(Refused::Full(3)));
        drop(t1);
        assert!(a.admit(y).is_ok());
    }

    #[test]
    fn a_reserved_peer_finds_a_place_whatever_strangers_hold() {
        let orchestrator: IpAddr = "198.18.0.1".parse().unwrap();
        let a = Admission::reserving(
            Limits {
                max_connections: 4,
                max_per_peer: 2,
            },
            vec![orchestrator],
        );
        // Strangers from two addresses fill the listener.
        let strangers: Vec<IpAddr> =
            vec!["198.18.0.7".parse().unwrap(), "198.18.0.8".parse().unwrap()];
        let held: Vec<_> = strangers
            .iter()
            .flat_map(|s| [a.admit(*s).unwrap(), a.admit(*s).unwrap()])
            .collect();
        assert_eq!(
            a.admit("198.18.0.9".parse().unwrap()).err(),
            Some(Refused::Full(4))
        );
        // The orchestrator still gets in, within its own per-peer maximum.
        let o1 = a.admit(orchestrator).unwrap();
        let _o2 = a.admit(orchestrator).unwrap();
        assert_eq!(a.admit(orchestrator).err(), Some(Refused::PeerFull(2)));
        // Its places do not count in the total: a stranger's place freed is a stranger's.
        drop(o1);
        drop(held);
        let _again: Vec<_> = (0..4)
            .map(|i| {
                a.admit(strangers[i % 2])
                    .or_else(|_| a.admit("198.18.0.9".parse().unwrap()))
            })
            .collect();
        assert_eq!(
            a.admit("198.18.0.10".parse().unwrap()).err(),
            Some(Refused::Full(4))
        );
    }
}
