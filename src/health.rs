//! Health and metrics endpoints of a server or edge: `GET /healthz` (the process answers),
//! `GET /readyz` (connected to its broker, its store checked, the run not over) and
//! `GET /metrics` (Prometheus text format, version 0.0.4): rounds, participants, failures, bytes,
//! round time, clients online and, under differential privacy, the ε spent.
//!
//! The driver updates a [`Health`] as the run goes; [`serve`] answers from it. Kubernetes
//! probes and Prometheus scrape these; nothing in them is secret (no client names), and the
//! listener is plain HTTP on the address the operator gives (`--health`,
//! `fedmq_args.health_listen`).

use crate::metrics::RoundRecord;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the endpoints report, updated by the server's or edge's driver.
#[derive(Debug)]
pub struct Health {
    role: &'static str,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    connected: bool,
    finished: Option<String>,
    online: usize,
    rounds: u64,
    round: u64,
    participants: u64,
    failures: u64,
    failures_total: u64,
    bytes_total: u64,
    round_seconds: f64,
    round_seconds_total: f64,
    num_samples: u64,
    test_accuracy: Option<f64>,
    epsilon: Option<f64>,
    /// An edge: rounds it could not complete for its upstream.
    failed_rounds: u64,
}

impl Health {
    /// The state of a `role` (`server`, `edge`), not ready yet.
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            state: Mutex::new(State::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain numbers: still readable.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    /// The broker session and the store check succeeded (or the link was lost: `false`).
    pub fn set_connected(&self, connected: bool) {
        self.with(|s| s.connected = connected);
    }

    /// Clients online now.
    pub fn set_online(&self, online: usize) {
        self.with(|s| s.online = online);
    }

    /// A closed round.
    pub fn round_closed(&self, r: &RoundRecord) {
        self.with(|s| {
            s.rounds += 1;
            s.round = r.round;
            s.participants = r.participants as u64;
            s.failures = r.failures as u64;
            s.failures_total += r.failures as u64;
            s.bytes_total += r.bytes;
            s.round_seconds = r.round_s;
            s.round_seconds_total += r.round_s;
            s.num_samples = r.num_samples;
            if r.test_accuracy.is_some() {
                s.test_accuracy = r.test_accuracy;
            }
            if let Some(e) = r.strategy.get("dp_epsilon") {
                s.epsilon = Some(*e);
            }
        });
    }

    /// A round that produced no model (an edge's site missed its quorum).
    pub fn round_failed(&self, round: u64) {
        self.with(|s| {
            s.round = round;
            s.failed_rounds += 1;
        });
    }

    /// The run is over (`outcome`: completed, aborted: …): no longer ready.
    pub fn finished(&self, outcome: &str) {
        self.with(|s| s.finished = Some(outcome.to_string()));
    }

    /// Whether `/readyz` answers 200, and why not.
    pub fn ready(&self) -> Result<(), String> {
        self.with(|s| match (&s.finished, s.connected) {
            (Some(o), _) => Err(format!("the run is over ({o})")),
            (None, false) => Err("not connected to the broker and store yet".into()),
            (None, true) => Ok(()),
        })
    }

    /// The Prometheus text exposition of the state.
    pub fn render(&self) -> String {
        let s = self.with(|s| s.clone());
        let role = self.role;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP fedmq_{name} {help}");
            let _ = writeln!(out, "# TYPE fedmq_{name} {kind}");
            let _ = writeln!(out, "fedmq_{name}{{role=\"{role}\"}} {value}");
        };
        let up = |b: bool| if b { 1.0 } else { 0.0 };
        metric(
            "ready",
            "gauge",
            "1 when connected and the run is not over.",
            up(s.connected && s.finished.is_none()),
        );
        metric(
            "clients_online",
            "gauge",
            "Clients (devices, or edges at the cloud) online.",
            s.online as f64,
        );
        metric(
            "round",
            "gauge",
            "The latest round closed (or failed).",
            s.round as f64,
        );
        metric("rounds_total", "counter", "Rounds closed.", s.rounds as f64);
        metric(
            "round_participants",
            "gauge",
            "Updates aggregated in the latest round.",
            s.participants as f64,
        );
        metric(
            "round_failures",
            "gauge",
            "Selected clients that contributed nothing in the latest round.",
            s.failures as f64,
        );
        metric(
            "client_failures_total",
            "counter",
            "Client failures over all rounds.",
            s.failures_total as f64,
        );
        metric(
            "round_seconds",
            "gauge",
            "Wall time of the latest round.",
            s.round_seconds,
        );
        metric(
            "round_seconds_total",
            "counter",
            "Wall time of all rounds.",
            s.round_seconds_total,
        );
        metric(
            "bytes_total",
            "counter",
            "Model bytes moved through the store (global models and updates).",
            s.bytes_total as f64,
        );
        metric(
            "round_samples",
            "gauge",
            "Training samples behind the latest aggregate.",
            s.num_samples as f64,
        );
        metric(
            "failed_rounds_total",
            "counter",
            "Rounds that ended without a model (an edge's site missed its quorum).",
            s.failed_rounds as f64,
        );
        if let Some(a) = s.test_accuracy {
            metric(
                "test_accuracy",
                "gauge",
                "Test accuracy of the latest evaluated global model.",
                a,
            );
        }
        if let Some(e) = s.epsilon {
            metric(
                "dp_epsilon",
                "gauge",
                "Privacy budget spent so far (epsilon, at dp_args.delta).",
                e,
            );
        }
        out
    }
}

fn respond(health: &Health, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let text = |code: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".into(),
            PLAIN,
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => match health.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into(), PLAIN),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                PLAIN,
            ),
        },
        "/metrics" => text(
            StatusCode::OK,
            health.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {other:?}: use /healthz, /readyz or /metrics\n"),
            PLAIN,
        ),
    }
}

/// Binds `addr` and answers the endpoints from `health` until `cancel` fires. Returns the bound
/// address (port 0 picks a free one).
///
/// # Errors
/// The address cannot be bound; the message names it.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "the health endpoint cannot listen on {addr}: {e}; pick another address with \
             --health or fedmq_args.health_listen"
        )
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let socket = tokio::select! {
                () = cancel.cancelled() => break,
                res = listener.accept() => match res {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::debug!("health endpoint: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let health = health.clone();
            let service = hyper::service::service_fn(move |req| {
                let r = respond(&health, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let conn = http
                .serve_connection(TokioIo::new(socket), service)
                .into_owned();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!("health endpoint: connection ended: {e}");
                    },
                    () = cancel.cancelled() => {}
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(round: u64, eps: Option<f64>) -> RoundRecord {
        RoundRecord {
            round,
            test_accuracy: Some(0.9),
            test_loss: Some(0.3),
            train_loss: Some(0.4),
            round_s: 1.5,
            eval_s: None,
            elapsed_s: 3.0,
            bytes: 1000,
            participants: 4,
            failures: 1,
            failed_clients: vec!["client-3: timed out".into()],
            num_samples: 400,
            retries: 0,
            strategy: eps
                .map(|e| BTreeMap::from([("dp_epsilon".to_string(), e)]))
                .unwrap_or_default(),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let code = buf[9..12].parse().unwrap();
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    #[tokio::test]
    async fn endpoints_follow_the_run() {
        let h = Arc::new(Health::new("server"));
        let cancel = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), h.clone(), cancel.clone())
            .await
            .unwrap();
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503, "not connected yet: {body}");
        assert!(body.contains("not connected"), "{body}");
        h.set_connected(true);
        h.set_online(7);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        h.round_closed(&record(1, None));
        h.round_closed(&record(2, Some(1.25)));
        let (code, m) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        for line in [
            "fedmq_round{role=\"server\"} 2",
            "fedmq_rounds_total{role=\"server\"} 2",
            "fedmq_round_participants{role=\"server\"} 4",
            "fedmq_client_failures_total{role=\"server\"} 2",
            "fedmq_bytes_total{role=\"server\"} 2000",
            "fedmq_round_seconds_total{role=\"server\"} 3",
            "fedmq_clients_online{role=\"server\"} 7",
            "fedmq_dp_epsilon{role=\"server\"} 1.25",
            "fedmq_ready{role=\"server\"} 1",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        // Every sample line has its HELP and TYPE, and parses as name{labels} value.
        for l in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.split_once(' ').unwrap();
            assert!(
                name.starts_with("fedmq_") && name.ends_with("{role=\"server\"}"),
                "{l}"
            );
            value.parse::<f64>().unwrap();
            let bare = name.split('{').next().unwrap();
            assert!(m.contains(&format!("# TYPE {bare} ")), "{l}");
        }
        assert!(!m.contains("client-3"), "no client names in the metrics");
        h.finished("completed");
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("over"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_taken_address_is_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = serve(
            addr,
            Arc::new(Health::new("edge")),
            CancellationToken::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&addr.to_string()) && e.contains("--health"),
            "{e}"
        );
    }
}
