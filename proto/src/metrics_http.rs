//! `/metrics` over HTTP for the orchestrator and the agents: OpenMetrics when the scraper asks
//! for it (Prometheus does), Prometheus's classic text format otherwise (promtool, older
//! scrapers). Bounded: a few connections at once (more are closed on accept), a deadline for
//! the request's headers and for the whole exchange, no keep-alive; an accept error (file
//! descriptors exhausted) is waited out, never fatal.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

/// Scrape connections held at once, in all and per peer address; more are closed as they
/// arrive (a flood from one address leaves room for the Prometheus server).
pub const LIMITS: crate::admission::Limits = crate::admission::Limits {
    max_connections: 64,
    max_per_peer: 8,
};
/// Time a client has to send its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one connection may last in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `/metrics` on `address`, each scrape answered with `encode()` (OpenMetrics text, as
/// prometheus-client writes it), on the current tokio runtime. Returns the bound address.
pub fn serve(
    encode: impl Fn() -> String + Send + Sync + 'static,
    address: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(address)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let encode = Arc::new(encode);
    let admission = crate::admission::Admission::new(LIMITS);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, reason = %e, "metrics: connection closed on arrival");
                    continue;
                }
            };
            let encode = encode.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let encode = encode.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &*encode)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                drop(slot);
            });
        }
    });
    Ok(bound)
}

fn answer<B>(request: &Request<B>, encode: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: try /metrics")));
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        return r;
    }
    let openmetrics = request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.contains("application/openmetrics-text"))
        });
    let (body, content_type) = if openmetrics {
        (
            encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            to_classic(&encode()),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// The same exposition in Prometheus's classic text format (0.0.4): a counter family is named
/// after its `_total` sample, and there is no `# EOF`.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_after_their_total() {
        let om = "# HELP bmfleet_passes Passes.\n# TYPE bmfleet_passes counter\nbmfleet_passes_total{kind=\"hot\"} 3\n# HELP bmfleet_up Up.\n# TYPE bmfleet_up gauge\nbmfleet_up 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP bmfleet_passes_total Passes.\n# TYPE bmfleet_passes_total counter\nbmfleet_passes_total{kind=\"hot\"} 3\n# HELP bmfleet_up Up.\n# TYPE bmfleet_up gauge\nbmfleet_up 1\n"
        );
    }
}
