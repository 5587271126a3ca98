//! A webhook receiver for the tests, as a customer portal runs one: HTTPS with its own CA,
//! checks each request's HMAC-SHA256 signature with the shared secret, answers 503 to the
//! first tries of each notice (or to every request while held), and records what it got.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Request {
    /// `Idempotency-Key` and `X-Bmfleet-Event`.
    pub key: String,
    /// The event's kind.
    pub kind: String,
    /// The body, parsed.
    pub body: serde_json::Value,
    /// The signature matched the body under the shared secret.
    pub signed: bool,
    /// What the receiver answered.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Request>,
}

/// A running receiver (stops when dropped).
pub struct Receiver {
    /// Where it listens (in the namespace its listener was bound in).
    pub port: u16,
    /// Its CA's certificate (PEM), the orchestrator's `ca_file`.
    pub ca_file: PathBuf,
    /// The shared secret's file, the orchestrator's `secret_file`.
    pub secret_file: PathBuf,
    inner: Arc<Mutex<Inner>>,
    hold: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Tries of each key answered 503 before one is accepted.
const REFUSED_TRIES: usize = 2;

impl Receiver {
    /// Serves on `listener` (bound by the caller, e.g. inside a lab namespace) with a fresh CA
    /// and a certificate for `localhost`; its files go in `dir`.
    pub fn start(listener: std::net::TcpListener, secret: &str, dir: &Path) -> Receiver {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test webhook CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        let ca_file = dir.join("webhook-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("CA file");
        let secret_file = dir.join("webhook.secret");
        std::fs::write(&secret_file, format!("{secret}\n")).expect("secret file");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let hold = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (i, h, secret) = (inner.clone(), hold.clone(), secret.as_bytes().to_vec());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                tokio::select! {
                    _ = stopped => {}
                    _ = async {
                        loop {
                            let Ok((tcp, _)) = listener.accept().await else { continue };
                            let (acceptor, i, h, secret) = (acceptor.clone(), i.clone(), h.clone(), secret.clone());
                            tokio::spawn(async move {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    let _ = serve(tls, &i, &h, &secret).await;
                                }
                            });
                        }
                    } => {}
                }
            });
        });
        Receiver {
            port,
            ca_file,
            secret_file,
            inner,
            hold,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// While held, every request is answered 503.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request, records it and answers.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    inner: &Mutex<Inner>,
    hold: &AtomicBool,
    secret: &[u8],
) -> std::io::Result<()> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let body = &data[head_end..(head_end + length).min(data.len())];
    let expected = {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, body);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256={hex}")
    };
    let signed = header("x-bmfleet-signature-256") == expected;
    let key = header("idempotency-key");
    let status = {
        let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
        let tries = inner.requests.iter().filter(|r| r.key == key).count();
        let status = if !signed {
            401
        } else if hold.load(Ordering::SeqCst) || tries < REFUSED_TRIES {
            503
        } else {
            200
        };
        inner.requests.push(Request {
            key,
            kind: header("x-bmfleet-event"),
            body: serde_json::from_slice(body).unwrap_or_default(),
            signed,
            status,
        });
        status
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Service Unavailable",
    };
    stream
        .write_all(
            format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    stream.shutdown().await
}
