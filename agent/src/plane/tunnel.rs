//! The agents' data-plane wire: a target opens a mutual-TLS connection to the origin's data
//! listener, sends one JSON line naming its grant and what it wants, and reads one JSON line
//! back. After an admission, the connection carries rsync's own protocol (raw, both ways) or
//! framed streams (dumps, manifests).

use std::sync::Arc;
use std::time::Duration;

use bmfleet_proto::v1::OriginEndpoint;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The longest header or reply line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// What a target asks of the origin's data plane.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TunnelRequest {
    /// Run `rsync --server --sender` with (a checked version of) this argv.
    Rsync {
        /// The grant id.
        grant: String,
        /// The remote command rsync gave its remote shell.
        argv: Vec<String>,
        /// With `--files-from` the journal token: the grant id of the full pass whose start
        /// the journal's paths are counted from.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        journal_since: String,
    },
    /// The paths the origin's change journal recorded since the full pass of grant `since`
    /// began: NUL-separated BlueMind paths as data frames; the end frame says whether the
    /// journal is complete (`ok`) or why not (`error`: walk everything instead).
    Changes {
        /// The grant id (data dirs).
        grant: String,
        /// The full pass's grant id.
        since: String,
        /// Each path's state (`manifest::PathState`, JSON) instead of its name: what the
        /// target verifies its copy against.
        #[serde(default)]
        manifest: bool,
    },
    /// The state of every path of the origin's configuration set (`manifest::PathState`,
    /// owners by name, JSON) as data frames: what the target compares its staged copy with.
    ConfigManifest {
        /// The grant id (config set).
        grant: String,
    },
    /// Stream a dump of one database.
    DumpDatabase {
        /// The grant id.
        grant: String,
        /// The database.
        database: String,
        /// Its schema only (a subscriber's tables before the initial copy; allowed under a
        /// replication grant too).
        #[serde(default)]
        schema_only: bool,
    },
    /// The databases' per-table manifest (and what the target needs to own them).
    DatabaseManifest {
        /// The grant id.
        grant: String,
        /// Only the databases' names, their sequences' values and the credentials, no table
        /// checksums.
        #[serde(default)]
        names_only: bool,
    },
    /// Follow the cluster: a replication role and slot are made, their ticket sent as a JSON
    /// line, then the base backup (tar) as data frames.
    BaseBackup {
        /// The grant id (replication).
        grant: String,
    },
    /// Publish every BlueMind database for a subscriber: a replication role, publications and
    /// logical slots are made, their ticket sent as a JSON line.
    Publish {
        /// The grant id (replication).
        grant: String,
    },
    /// A standby's (or subscriber's) connection to the origin's PostgreSQL, relayed byte for
    /// byte.
    Replication {
        /// The grant id (replication).
        grant: String,
    },
    /// The origin's WAL position now (one JSON line).
    WalPosition {
        /// The grant id (databases).
        grant: String,
    },
    /// A verified point with the standby (`verified_point::establish`): the origin answers
    /// `Held`, waits for the standby's `Taken`, answers `OriginSums`.
    VerifiedPoint {
        /// The grant id (replication).
        grant: String,
        /// A subscriber's point (`block_point`): the origin sums block by block and keeps
        /// the sums; the totals are answered.
        #[serde(default)]
        per_block: bool,
    },
    /// The downtime's gate after a subscriber's point: the origin's totals now, from the
    /// point it kept (`block_point::PointTotals`).
    ChangedTotals {
        /// The grant id (databases).
        grant: String,
        /// The point's WAL position on the origin.
        since: String,
    },
    /// The downtime's gate: the blocks the origin's WAL names since a verified point
    /// (`Selection`), then the origin's sums of them (`SelectedSums`).
    ChangedBlocks {
        /// The grant id (databases).
        grant: String,
        /// The verified point's WAL position.
        since: String,
        /// Its tables' files.
        tables: Vec<crate::plane::tunnel::TableFile>,
    },
}

impl TunnelRequest {
    /// The grant the request is made under.
    pub fn grant(&self) -> &str {
        match self {
            TunnelRequest::Rsync { grant, .. }
            | TunnelRequest::Changes { grant, .. }
            | TunnelRequest::ConfigManifest { grant }
            | TunnelRequest::DumpDatabase { grant, .. }
            | TunnelRequest::DatabaseManifest { grant, .. }
            | TunnelRequest::BaseBackup { grant }
            | TunnelRequest::Publish { grant }
            | TunnelRequest::Replication { grant }
            | TunnelRequest::WalPosition { grant }
            | TunnelRequest::VerifiedPoint { grant, .. }
            | TunnelRequest::ChangedTotals { grant, .. }
            | TunnelRequest::ChangedBlocks { grant, .. } => grant,
        }
    }

    /// The request's kind, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelRequest::Rsync { .. } => "rsync",
            TunnelRequest::Changes { .. } => "changes",
            TunnelRequest::ConfigManifest { .. } => "config-manifest",
            TunnelRequest::DumpDatabase { .. } => "dump",
            TunnelRequest::DatabaseManifest { .. } => "manifest",
            TunnelRequest::BaseBackup { .. } => "base-backup",
            TunnelRequest::Publish { .. } => "publish",
            TunnelRequest::Replication { .. } => "replication",
            TunnelRequest::WalPosition { .. } => "wal-position",
            TunnelRequest::VerifiedPoint { .. } => "verified-point",
            TunnelRequest::ChangedBlocks { .. } => "changed-blocks",
            TunnelRequest::ChangedTotals { .. } => "changed-totals",
        }
    }
}

/// The origin's answer to a request line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunnelReply {
    /// Admitted?
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: String,
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// TCP or TLS failed.
    #[error("cannot reach the origin {name} at {address}: {detail}")]
    Connect {
        /// Origin name.
        name: String,
        /// Origin address.
        address: String,
        /// Why.
        detail: String,
    },
    /// The origin refused the request.
    #[error("the origin {name} refused: {reason}")]
    Refused {
        /// Origin name.
        name: String,
        /// Its reason.
        reason: String,
    },
    /// The origin broke the wire protocol.
    #[error("protocol error with the origin: {0}")]
    Protocol(String),
}

/// A connection to the origin's data plane after admission.
pub type Tunnel = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens a tunnel to `origin`, presenting the target's identity, and asks for `request`.
pub async fn open(
    origin: &OriginEndpoint,
    tls: Arc<rustls::ClientConfig>,
    request: &TunnelRequest,
    timeout: Duration,
) -> Result<Tunnel, TunnelError> {
    let connect_err = |detail: String| TunnelError::Connect {
        name: origin.name.clone(),
        address: origin.address.clone(),
        detail,
    };
    let server_name = ServerName::try_from(origin.name.clone())
        .map_err(|e| connect_err(format!("invalid origin name: {e}")))?;
    let admitted = async {
        let tcp = TcpStream::connect(origin.address.as_str())
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| connect_err(e.to_string()))?;
        keep_alive(&tcp);
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| connect_err(bmfleet_proto::error_chain::describe(&e)))?;
        let mut stream = BufReader::new(tls);
        write_json_line(&mut stream, request)
            .await
            .map_err(|e| connect_err(bmfleet_proto::error_chain::describe(&e)))?;
        let reply: TunnelReply = read_json_line(&mut stream).await.map_err(|e| match e {
            LineError::Io(e) => connect_err(bmfleet_proto::error_chain::describe(&e)),
            other => TunnelError::Protocol(other.to_string()),
        })?;
        if !reply.ok {
            return Err(TunnelError::Refused {
                name: origin.name.clone(),
                reason: reply.error,
            });
        }
        Ok(stream)
    };
    tokio::time::timeout(timeout, admitted)
        .await
        .map_err(|_| connect_err(format!("no admission within {}s", timeout.as_secs())))?
}

/// Opens a tunnel for `request` and reads the origin's JSON answer line (`what` names it in
/// errors); the tunnel is returned for what follows the line (a base backup's frames).
pub async fn ask<T: for<'de> Deserialize<'de>>(
    origin: &OriginEndpoint,
    tls: Arc<rustls::ClientConfig>,
    request: &TunnelRequest,
    timeout: Duration,
    what: &str,
) -> Result<(Tunnel, T), String> {
    let mut stream = open(origin, tls, request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let answer = read_json_line(&mut stream)
        .await
        .map_err(|e| format!("reading {what}: {e}"))?;
    Ok((stream, answer))
}

/// Relays a tunnel to a local pair of pipes until `source` (what flows into the tunnel)
/// ends, then closes the tunnel's sending side. Meanwhile the tunnel's input is copied into
/// `sink`, which is dropped (closed) as soon as that input ends. Returns the bytes sent.
pub async fn relay<T, R, W>(tunnel: &mut T, mut source: R, mut sink: W) -> std::io::Result<u64>
where
    T: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut from_tunnel, mut to_tunnel) = tokio::io::split(tunnel);
    let inbound = async move {
        let _ = tokio::io::copy(&mut from_tunnel, &mut sink).await;
        let _ = sink.shutdown().await;
        drop(sink);
    };
    let outbound = async move {
        let sent = tokio::io::copy(&mut source, &mut to_tunnel).await;
        let _ = to_tunnel.shutdown().await;
        sent
    };
    tokio::pin!(inbound, outbound);
    tokio::select! {
        sent = &mut outbound => sent,
        _ = &mut inbound => outbound.await,
    }
}

/// A JSON line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer closed before a line.
    #[error("connection closed before a complete line")]
    Closed,
    /// Over [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not the expected JSON.
    #[error("malformed line: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads one newline-terminated JSON value.
pub async fn read_json_line<R, T>(reader: &mut R) -> Result<T, LineError>
where
    R: AsyncBufReadExt + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            LineError::TooLong
        } else {
            LineError::Closed
        });
    }
    Ok(serde_json::from_slice(&line)?)
}

/// Writes one JSON value and a newline, and flushes.
pub async fn write_json_line<W, T>(writer: &mut W, value: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await
}

/// Frame kinds of a framed stream: data, then one end frame with a JSON [`TunnelReply`].
const FRAME_DATA: u8 = 0;
const FRAME_END: u8 = 1;
/// Largest data frame.
pub const FRAME_MAX: usize = 256 * 1024;

/// Copies `source` to `sink` as data frames, then writes the end frame for `outcome`.
/// Returns the number of payload bytes.
pub async fn send_framed<R, W>(source: &mut R, sink: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FRAME_MAX];
    let mut total = 0u64;
    loop {
        let n = source.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        sink.write_u8(FRAME_DATA).await?;
        sink.write_u32(n as u32).await?;
        sink.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

/// Writes the end frame of a framed stream.
pub async fn end_framed<W: AsyncWrite + Unpin>(
    sink: &mut W,
    outcome: &TunnelReply,
) -> std::io::Result<()> {
    let json = serde_json::to_vec(outcome).map_err(std::io::Error::other)?;
    sink.write_u8(FRAME_END).await?;
    sink.write_u32(json.len() as u32).await?;
    sink.write_all(&json).await?;
    sink.flush().await
}

/// Copies the data frames of `source` into `sink` until the end frame, which it returns
/// with the payload byte count.
pub async fn receive_framed<R, W>(
    source: &mut R,
    sink: &mut W,
) -> std::io::Result<(TunnelReply, u64)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FRAME_MAX];
    let mut total = 0u64;
    loop {
        let kind = source.read_u8().await?;
        let len = source.read_u32().await? as usize;
        if len > FRAME_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds {FRAME_MAX}"),
            ));
        }
        source.read_exact(&mut buf[..len]).await?;
        match kind {
            FRAME_DATA => {
                sink.write_all(&buf[..len]).await?;
                total += len as u64;
            }
            FRAME_END => {
                sink.flush().await?;
                let outcome = serde_json::from_slice(&buf[..len])
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                return Ok((outcome, total));
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown frame kind {other}"),
                ))
            }
        }
    }
}

/// TCP keepalives on a data-plane connection: a peer that vanished without closing (host
/// down, link cut) is noticed within about 30 s, so a transfer's processes end instead of
/// waiting on it for hours (chaos finding: an origin's `rsync --server` outlived its
/// instance after its pair was cut off).
pub fn keep_alive(tcp: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "data plane: no TCP keepalive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn framed_streams_round_trip_with_their_outcome() {
        let payload: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        let sent = send_framed(&mut payload.as_slice(), &mut wire)
            .await
            .unwrap();
        let outcome = TunnelReply {
            ok: false,
            error: "pg_dump exited with code 1".into(),
        };
        end_framed(&mut wire, &outcome).await.unwrap();
        let mut out = Vec::new();
        let (got, received) = receive_framed(&mut wire.as_slice(), &mut out)
            .await
            .unwrap();
        assert_eq!((sent, received), (600_000, 600_000));
        assert_eq!(out, payload);
        assert_eq!(got, outcome);
    }

    #[tokio::test]
    async fn a_truncated_stream_is_an_error_not_an_end() {
        let mut wire = Vec::new();
        send_framed(&mut &b"partial"[..], &mut wire).await.unwrap();
        let mut out = Vec::new();
        assert!(receive_framed(&mut wire.as_slice(), &mut out)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn json_lines_refuse_oversized_and_unterminated_input() {
        let long = vec![b'a'; MAX_LINE + 10];
        let r: Result<TunnelReply, _> = read_json_line(&mut BufReader::new(long.as_slice())).await;
        assert!(matches!(r, Err(LineError::TooLong)));
        let r: Result<TunnelReply, _> =
            read_json_line(&mut BufReader::new(&b"{\"ok\":true}"[..])).await;
        assert!(matches!(r, Err(LineError::Closed)));
    }
}

/// One table's file when the verified point was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableFile {
    /// The database.
    pub database: String,
    /// Its schema.
    pub schema: String,
    /// The table.
    pub table: String,
    /// `pg_relation_filenode`.
    pub filenode: u32,
}
