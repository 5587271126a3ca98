//! How an origin answers an admitted data-plane request: the admission line, a refusal, a
//! child's output streamed as data frames with its outcome at the end. Every room's handler
//! of a verb answers through these.

use std::process::Stdio;

use bmfleet_proto::admission::Admitted;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::plane::tunnel::{end_framed, send_framed, write_json_line, TunnelReply};

/// An admitted data-plane connection.
pub type Connection = Admitted<tokio_rustls::server::TlsStream<TcpStream>>;

/// An admitted data-plane connection, as a verb's handler reads and writes it.
pub type Stream = BufReader<Connection>;

/// Tells the client its request is admitted (what follows is the answer).
pub async fn admit<S: AsyncWrite + Unpin>(stream: &mut S) -> Result<(), String> {
    write_json_line(
        stream,
        &TunnelReply {
            ok: true,
            error: String::new(),
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// Starts `command`, admits the client (then sends `preamble` as a JSON line, if any),
/// streams the command's stdout as data frames and ends with its outcome (exit status and
/// stderr).
pub async fn stream_output(
    program: &str,
    mut command: Command,
    preamble: Option<serde_json::Value>,
    stream: &mut Stream,
) -> Result<(), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    admit(stream).await?;
    if let Some(preamble) = preamble {
        write_json_line(stream, &preamble)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("{program} has no stdout"))?;
    let sent = send_framed(&mut stdout, stream).await;
    let out = child.wait_with_output().await;
    let outcome = finish(program, sent.map(|_| ()), out);
    end_framed(stream, &outcome)
        .await
        .map_err(|e| e.to_string())
}

/// The end-frame outcome of a streamed child.
fn finish(
    program: &str,
    sent: std::io::Result<()>,
    out: std::io::Result<std::process::Output>,
) -> TunnelReply {
    let error = match (sent, out) {
        (Err(e), _) => format!("streaming {program}'s output: {e}"),
        (_, Err(e)) => format!("waiting for {program}: {e}"),
        (Ok(()), Ok(out)) if !out.status.success() => format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        _ => String::new(),
    };
    TunnelReply {
        ok: error.is_empty(),
        error,
    }
}

pub async fn refuse(stream: &mut Stream, error: String) -> std::io::Result<()> {
    write_json_line(stream, &TunnelReply { ok: false, error }).await?;
    stream.shutdown().await
}
