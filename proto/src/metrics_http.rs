//! `/metrics` over HTTP for the orchestrator and the agents: OpenMetrics when the scraper asks
//! for it (Prometheus does), Prometheus's classic text format otherwise (promtool, older
//! scrapers), from a thread of its own.

use std::net::SocketAddr;

/// Serves `/metrics` on `address`, each scrape answered with `encode()` (OpenMetrics text, as
/// prometheus-client writes it). Returns the bound address.
pub fn serve(
    encode: impl Fn() -> String + Send + 'static,
    address: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(address).map_err(std::io::Error::other)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("metrics listener has no IP address"))?;
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let response = if request.url() == "/metrics" {
                let openmetrics = request.headers().iter().any(|h| {
                    h.field.equiv("Accept")
                        && h.value.as_str().contains("application/openmetrics-text")
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
                let mut r = tiny_http::Response::from_string(body);
                if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
                    r.add_header(h);
                }
                r
            } else {
                tiny_http::Response::from_string("not found: try /metrics").with_status_code(404)
            };
            let _ = request.respond(response);
        }
    });
    Ok(bound)
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
