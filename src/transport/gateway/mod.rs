//! The authorizing MQTT gateway in front of the embedded rumqttd: authentication (user table,
//! Mosquitto password file, or client certificate), per-topic ACLs in Mosquitto's `acl_file`
//! format, TLS with optional client-certificate verification, and guards against hostile
//! connections. rumqttd 0.20 has none of the first three; this module adds them without changing
//! rumqttd.
//!
//! # Layout
//! - `framing.rs`, framing and packets: [`frame`] splits the client→broker byte stream into
//!   MQTT 3.1.1 packets (bounded by the broker's packet limit), [`parse`] reads the few packets
//!   the gateway must understand (CONNECT, PUBLISH, SUBSCRIBE) and checks the fixed-header flags
//!   of the others; [`Credential`], the internal credential forwarded CONNECTs carry. Pure
//!   functions, no I/O (fuzzed by the tests in `tests.rs`).
//! - `acl.rs`: [`Acl`], Mosquitto's ACL file (`topic`, `user`, `pattern` with `%u`/`%c`, `deny`).
//! - `passwords.rs`: [`PasswordFile`], Mosquitto's password file (`$7$` PBKDF2-SHA512 and `$6$`
//!   SHA-512 hashes, as `mosquitto_passwd` writes them).
//! - `cert_name.rs`: [`common_name`], the participant a verified client certificate names.
//! - this file: [`spawn`], the I/O driver: one thread with its own tokio runtime (like rumqttd's
//!   own listener threads), an accept loop, and one task per connection, with its guards
//!   ([`FailureBudget`], the pending set).
//!
//! Design: the gateway owns the public listener; rumqttd listens on 127.0.0.1 on a free port
//! and accepts only an internal random credential that the gateway writes into every CONNECT it
//! forwards, so no local process can bypass the gateway by connecting to rumqttd directly.
//! Broker→client bytes are copied unchanged; client→broker bytes are framed and checked packet by
//! packet. A refused PUBLISH or SUBSCRIBE closes the connection (MQTT 3.1.1 allows a server to
//! close the connection on a packet it will not accept; MQTT 3.1.1 has no negative PUBACK).
//! Mosquitto instead drops a refused PUBLISH silently and answers a refused SUBSCRIBE with
//! return code 0x80: a client sees the refusal either way, as a lost message or as a closed
//! connection. Refused packets never reach rumqttd.
//!
//! Design: rumqttd keys persistent sessions by client id. The gateway forwards the client id
//! prefixed with the authenticated user name (`<len>:<user>:<client id>`), so a client that
//! reuses another participant's client id neither takes over that participant's session (and
//! the commands queued in it, which it could not subscribe to) nor disconnects it. ACL patterns
//! (`%c`) see the client id as the client sent it.

mod acl;
mod cert_name;
mod framing;
mod passwords;
#[cfg(test)]
mod tests;

pub(crate) use acl::Acl;
pub(crate) use framing::{put_remaining_length, Credential};
pub(crate) use passwords::PasswordFile;

use acl::Action;
use cert_name::common_name;
use framing::{frame, parse, Packet, Refusal};
use passwords::ct_eq_secret;

use bytes::{Buf, BytesMut};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Failures a source address may cause before it is treated as abusive: a token bucket
/// that only failures drain (a connection closed or refused before its CONNECT was accepted:
/// malformed bytes, a wrong password, no CONNECT in time, a failed TLS handshake). Successful
/// connections cost nothing, so any number of honest devices may share one address (a NAT, a
/// compose network, a load test). An address over its budget is not refused (honest devices
/// behind it still connect): its new connections get [`ABUSIVE_CONNECT_WINDOW`] instead of
/// `connection_timeout_ms` to send CONNECT, are the first shed when the pending cap is reached,
/// and their failures are logged at debug level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureBudget {
    /// Failures a source may cause at once.
    pub burst: u32,
    /// Refill rate: failures per second.
    pub per_second: f64,
}

impl Default for FailureBudget {
    /// Burst 20, then 10 per second.
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 10.0,
        }
    }
}

/// Time to send CONNECT for a connection from an address over its [`FailureBudget`].
pub const ABUSIVE_CONNECT_WINDOW: Duration = Duration::from_secs(2);

struct Bucket {
    tokens: f64,
    last: Instant,
    /// The exhaustion was logged since the bucket was last full: log once per episode.
    warned: bool,
}

/// Failure buckets per key: source addresses (IPv6 grouped by /64, one host usually owns one,
/// see [`source_key`]) or user names.
struct RateLimiter<K = IpAddr> {
    rate: FailureBudget,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K> RateLimiter<K> {
    fn new(rate: FailureBudget) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

/// How long a wrong password for a user name over its failure budget waits for its refusal:
/// guessing a user's password costs the guesser a second per try and connection, a correct
/// password is never delayed.
pub const GUESS_DELAY: Duration = Duration::from_secs(1);

/// Most tracked sources; beyond it, full buckets are dropped, then (a flood from many
/// addresses) all of them: memory stays bounded.
const MAX_TRACKED_SOURCES: usize = 16_384;

fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl<K: std::hash::Hash + Eq> RateLimiter<K> {
    fn refill(&self, b: &mut Bucket, now: Instant) {
        let burst = f64::from(self.rate.burst);
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate.per_second).min(burst);
        b.last = now;
        if b.tokens >= burst {
            b.warned = false;
        }
    }

    /// True when `key` has used up its failure budget.
    fn abusive(&self, key: &K, now: Instant) -> bool {
        // A poisoned lock only means another task panicked mid-update; the map is still valid.
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(key) {
            None => false,
            Some(b) => {
                self.refill(b, now);
                b.tokens < 1.0
            }
        }
    }

    /// Counts one failure of `key`. Returns `(abusive, first)`: whether it is now over its
    /// budget, and whether this is the first failure of that episode (to log once).
    fn charge(&self, key: K, now: Instant) -> (bool, bool) {
        let burst = f64::from(self.rate.burst);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED_SOURCES && !map.contains_key(&key) {
            let rate = self.rate.per_second;
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if map.len() >= MAX_TRACKED_SOURCES {
                map.clear();
            }
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
            warned: false,
        });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
        }
        if b.tokens >= 1.0 {
            return (false, false);
        }
        let first = !b.warned;
        b.warned = true;
        (true, first)
    }
}

/// Connections that have not yet sent a complete CONNECT, oldest first; those from abusive
/// sources apart, so that they are shed first.
#[derive(Default)]
struct PendingSet {
    next: u64,
    normal: std::collections::BTreeMap<u64, tokio_util::sync::CancellationToken>,
    abusive: std::collections::BTreeMap<u64, tokio_util::sync::CancellationToken>,
}

/// A connection's place in the [`PendingSet`]; leaves it on [`done`](Self::done) or drop.
struct Pending {
    shared: Arc<Shared>,
    id: u64,
    abusive: bool,
    cancel: tokio_util::sync::CancellationToken,
    left: bool,
}

impl Pending {
    /// Registers a new connection; when the set is full, sheds (cancels) the oldest pending
    /// connection of an abusive source, else the oldest pending connection.
    fn register(shared: &Arc<Shared>, abusive: bool) -> Self {
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut set = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        let id = set.next;
        set.next += 1;
        if set.normal.len() + set.abusive.len() >= shared.cfg.max_pending {
            let victim = set.abusive.pop_first().or_else(|| set.normal.pop_first());
            if let Some((_, token)) = victim {
                token.cancel();
                let shed = shared
                    .shed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if shed.is_power_of_two() || shed == 0 {
                    tracing::warn!(
                        max = shared.cfg.max_pending,
                        shed = shed + 1,
                        "gateway: pending-connection cap reached: shedding the oldest \
                         connections that have not sent CONNECT (logged at 1, 2, 4, ... sheds)"
                    );
                }
            }
        }
        let slot = if abusive {
            &mut set.abusive
        } else {
            &mut set.normal
        };
        slot.insert(id, cancel.clone());
        drop(set);
        Self {
            shared: shared.clone(),
            id,
            abusive,
            cancel,
            left: false,
        }
    }

    /// The connection sent a complete CONNECT: it is authenticating and is never shed.
    fn done(&mut self) {
        if !self.left {
            self.left = true;
            let mut set = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let slot = if self.abusive {
                &mut set.abusive
            } else {
                &mut set.normal
            };
            slot.remove(&self.id);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.done();
    }
}

/// Who may connect and how they prove it.
#[derive(Debug)]
pub(crate) struct Auth {
    /// Plain user table (`BrokerOptions::users`).
    pub(crate) users: Option<HashMap<String, String>>,
    /// Mosquitto password file.
    pub(crate) passwords: Option<PasswordFile>,
    /// Mutual TLS: the client certificate's Common Name is the user name.
    pub(crate) client_cert: bool,
}

/// Everything the gateway needs; built by the embedded broker.
pub(crate) struct GatewayConfig {
    /// The public listener (already bound, so its port is known).
    pub(crate) listener: std::net::TcpListener,
    /// rumqttd's internal listener.
    pub(crate) upstream: SocketAddr,
    pub(crate) credential: Credential,
    pub(crate) auth: Auth,
    pub(crate) acl: Option<Acl>,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest remaining length accepted (`max_payload_size`).
    pub(crate) max_packet: usize,
    /// Time from accept to a forwarded CONNECT (TLS handshake included).
    pub(crate) connect_timeout: Duration,
    pub(crate) max_connections: usize,
    /// Connections that may be between accept and a complete CONNECT at once; beyond it the
    /// oldest is shed.
    pub(crate) max_pending: usize,
    pub(crate) rate: FailureBudget,
}

/// State shared by the accept loop and the connection tasks.
struct Shared {
    cfg: GatewayConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limiter: RateLimiter,
    /// Failed passwords per user name (password guessing from many addresses).
    users: RateLimiter<String>,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    /// Connections that have not sent a complete CONNECT.
    pending: Mutex<PendingSet>,
    /// Pending connections shed so far.
    shed: std::sync::atomic::AtomicU64,
    /// A "connection cap reached" warning was logged for the current episode (reset when a
    /// connection is admitted again).
    warned_full: std::sync::atomic::AtomicBool,
}

/// Starts the gateway on its own thread and runtime. It runs for the rest of the process, as
/// rumqttd does.
///
/// # Errors
/// The thread or the runtime could not be started, or the listener not registered.
pub(crate) fn spawn(cfg: GatewayConfig) -> std::io::Result<()> {
    cfg.listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fedmq-gateway")
        .enable_all()
        .build()?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(cfg.listener.try_clone()?)?
    };
    let shared = Arc::new(Shared {
        tls: cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        limiter: RateLimiter::new(cfg.rate),
        users: RateLimiter::new(cfg.rate),
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
        pending: Mutex::new(PendingSet::default()),
        shed: 0.into(),
        warned_full: false.into(),
        cfg,
    });
    std::thread::Builder::new()
        .name("fedmq-gateway".into())
        .spawn(move || rt.block_on(accept_loop(listener, shared)))?;
    Ok(())
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut backoff = Duration::from_millis(1);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => {
                backoff = Duration::from_millis(1);
                c
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "gateway: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(conn) = shared.connections.clone().try_acquire_owned() else {
            if !shared.warned_full.swap(true, Relaxed) {
                tracing::warn!(%peer, max = shared.cfg.max_connections,
                    "gateway: refusing connection: max_connections reached (logged once until \
                     a connection is admitted)");
            }
            continue;
        };
        let abusive = shared
            .limiter
            .abusive(&source_key(peer.ip()), Instant::now());
        let pending = Pending::register(&shared, abusive);
        shared.warned_full.store(false, Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _conn = conn;
            let _ = tcp.set_nodelay(true);
            handle(shared, tcp, peer, pending).await;
        });
    }
}

/// How a connection ended, when that is worth a warning.
enum End {
    /// Refused by a rule: logged as a warning with who and why.
    Refused(Refusal),
    /// CONNECT refused with this CONNACK return code.
    Connack(u8, String),
    /// Quiet ends (client closed, I/O error): debug only.
    Closed(String),
}

impl End {
    /// Ends that count against the source's failure budget: refusals and CONNACK refusals
    /// (a quiet close after a good CONNECT does not reach here).
    fn is_before_connect(&self) -> bool {
        matches!(self, End::Refused(_) | End::Connack(..) | End::Closed(_))
    }
}

/// Who a connection is, once CONNECT has been accepted.
#[derive(Debug, Clone)]
struct Who {
    user: String,
    client_id: String,
}

/// Counts a failure before CONNECT against `peer`'s address; true when the address is over
/// its budget (its failures are then logged at debug level).
fn charge(shared: &Shared, peer: SocketAddr) -> bool {
    let (abusive, first) = shared.limiter.charge(source_key(peer.ip()), Instant::now());
    if first {
        tracing::warn!(%peer, burst = shared.cfg.rate.burst,
            per_second = shared.cfg.rate.per_second,
            "gateway: this address keeps failing before CONNECT (malformed bytes, bad \
             credentials, idle sockets): its new connections get a short CONNECT window and \
             are shed first; further failures from it are logged at debug level until it \
             slows down");
    }
    abusive
}

async fn handle(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    mut pending: Pending,
) {
    let window = if pending.abusive {
        shared.cfg.connect_timeout.min(ABUSIVE_CONNECT_WINDOW)
    } else {
        shared.cfg.connect_timeout
    };
    let deadline = tokio::time::Instant::now() + window;
    let cancel = pending.cancel.clone();
    match &shared.tls {
        None => Box::pin(session(&shared, tcp, peer, None, &mut pending, deadline)).await,
        // The TLS state is made when the first bytes arrive, so that an idle socket costs
        // its task only.
        Some(acceptor) => match tokio::select! {
            r = tokio::time::timeout_at(deadline, async move {
                tcp.readable().await?;
                acceptor.accept(tcp).await
            }) => Some(r),
            () = cancel.cancelled() => None,
        } {
            None => {
                charge(&shared, peer);
                tracing::debug!(%peer, "gateway: shed during its TLS handshake");
            }
            Some(Ok(Ok(tls))) => {
                let cn = if shared.cfg.auth.client_cert {
                    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    match cert.and_then(|c| common_name(c.as_ref())) {
                        Some(cn) => Some(cn),
                        None => {
                            charge(&shared, peer);
                            tracing::warn!(%peer, "gateway: refusing connection: the client \
                                    certificate has no single Common Name to use as user name");
                            return;
                        }
                    }
                } else {
                    None
                };
                // Boxed: an idle socket's task is then only as large as the handshake.
                Box::pin(session(&shared, tls, peer, cn, &mut pending, deadline)).await;
            }
            Some(Ok(Err(e))) => {
                if charge(&shared, peer) {
                    tracing::debug!(%peer, error = %e, "gateway: TLS handshake failed");
                } else {
                    tracing::warn!(%peer, error = %e, "gateway: TLS handshake failed");
                }
            }
            Some(Err(_)) => {
                if charge(&shared, peer) {
                    tracing::debug!(%peer, "gateway: TLS handshake timed out");
                } else {
                    tracing::warn!(%peer, timeout = ?window,
                        "gateway: TLS handshake did not finish within the CONNECT window");
                }
            }
        },
    }
}

/// One connection after TCP accept (and TLS handshake): CONNECT, then relaying.
async fn session<S>(
    shared: &Shared,
    stream: S,
    peer: SocketAddr,
    cert_user: Option<String>,
    pending: &mut Pending,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // No buffer until bytes arrive: an idle connection costs its task and socket only.
    let mut buf = BytesMut::new();
    let cancel = pending.cancel.clone();
    let opened = tokio::select! {
        r = tokio::time::timeout_at(
            deadline,
            open(shared, &mut rd, &mut wr, &mut buf, cert_user, pending),
        ) => Some(r),
        () = cancel.cancelled() => None,
    };
    pending.done();
    let (who, upstream) = match opened {
        Some(Ok(Ok(opened))) => opened,
        Some(Ok(Err(end))) => {
            let quiet = end.is_before_connect() && charge(shared, peer);
            if quiet {
                tracing::debug!(%peer, "gateway: connection failed before CONNECT");
            } else {
                log_end(peer, None, end);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
            return;
        }
        Some(Err(_)) => {
            if !charge(shared, peer) {
                tracing::warn!(%peer, "gateway: closing connection: no CONNECT within its window");
            }
            return;
        }
        None => {
            charge(shared, peer);
            tracing::debug!(%peer, "gateway: shed before CONNECT (pending-connection cap)");
            return;
        }
    };
    let (mut up_rd, mut up_wr) = upstream.into_split();
    let end = tokio::select! {
        r = relay(shared, &who, &mut rd, &mut up_wr, &mut buf) => r,
        r = tokio::io::copy(&mut up_rd, &mut wr) => End::Closed(match r {
            Ok(_) => "broker closed the connection".into(),
            Err(e) => format!("broker→client: {e}"),
        }),
    };
    log_end(peer, Some(&who), end);
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

fn log_end(peer: SocketAddr, who: Option<&Who>, end: End) {
    let user = who.map(|w| w.user.as_str()).unwrap_or("");
    let client_id = who.map(|w| w.client_id.as_str()).unwrap_or("");
    match end {
        End::Refused(r) => {
            let topic = match &r {
                Refusal::Publish { topic, .. } => topic.as_str(),
                Refusal::Subscribe { filter, .. } => filter.as_str(),
                _ => "",
            };
            tracing::warn!(%peer, user, client_id, topic, reason = %r,
                "gateway: closing connection");
        }
        End::Connack(code, reason) => {
            tracing::warn!(%peer, code, %reason, "gateway: CONNECT refused");
        }
        End::Closed(reason) => tracing::debug!(%peer, user, client_id, %reason, "gateway: closed"),
    }
}

/// Reads the CONNECT, authenticates, checks the will, connects to rumqttd and forwards the
/// rewritten CONNECT. Bytes after the CONNECT stay in `buf` for [`relay`].
async fn open<R, W>(
    shared: &Shared,
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    cert_user: Option<String>,
    pending: &mut Pending,
) -> Result<(Who, tokio::net::TcpStream), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.cfg.max_packet;
    let (header, len) = loop {
        match frame(buf, max) {
            Ok(Some(f)) => break f,
            Ok(None) => read_more(rd, buf, max).await?,
            Err(r) => return Err(End::Refused(r)),
        }
    };
    // A whole packet arrived: from here the connection is authenticating, never shed.
    pending.done();
    let packet = buf.split_to(header + len);
    if packet[0] >> 4 != 1 {
        return Err(End::Refused(Refusal::Malformed(
            "the first packet is not CONNECT",
        )));
    }
    let connect = match parse(packet[0], &packet[header..]) {
        Ok(Packet::Connect(c)) => c,
        // Unreachable: type 1 parses as CONNECT or fails.
        Ok(_) => return Err(End::Refused(Refusal::Malformed("not a CONNECT"))),
        Err(Refusal::ProtocolLevel(l)) => {
            return Err(refuse(wr, 0x01, Refusal::ProtocolLevel(l).to_string()).await)
        }
        Err(r) => return Err(End::Refused(r)),
    };
    let user = match cert_user {
        Some(cn) => cn,
        None => {
            let Some(user) = connect.user else {
                return Err(
                    refuse(wr, 0x05, "no user name (authentication required)".into()).await,
                );
            };
            let password = connect.password.unwrap_or_default();
            if !authenticate(&shared.cfg.auth, user, password).await {
                let (guessed, first) = shared.users.charge(user.to_string(), Instant::now());
                if first {
                    tracing::warn!(
                        user,
                        burst = shared.cfg.rate.burst,
                        per_second = shared.cfg.rate.per_second,
                        "gateway: wrong passwords for this user name keep coming (password \
                         guessing?): each further wrong one is answered after {GUESS_DELAY:?}; \
                         the right password is not delayed"
                    );
                }
                if guessed {
                    tokio::time::sleep(GUESS_DELAY).await;
                }
                return Err(
                    refuse(wr, 0x04, format!("bad user name or password for {user:?}")).await,
                );
            }
            user.to_string()
        }
    };
    if let (Some(acl), Some((topic, _))) = (&shared.cfg.acl, connect.will) {
        if let Err(why) = acl.check(&user, connect.client_id, Action::Write, topic) {
            return Err(refuse(
                wr,
                0x05,
                format!("user {user:?}: will topic {topic:?} refused by the ACL: {why}"),
            )
            .await);
        }
    }
    let forward = match connect.forward(&user, &shared.cfg.credential) {
        Ok(f) if f.len() <= max + 5 => f,
        _ => return Err(refuse(wr, 0x02, "client id too long to namespace".into()).await),
    };
    let who = Who {
        user,
        client_id: connect.client_id.to_string(),
    };
    let mut up = tokio::net::TcpStream::connect(shared.cfg.upstream)
        .await
        .map_err(|e| End::Closed(format!("connecting to the internal broker: {e}")))?;
    let _ = up.set_nodelay(true);
    up.write_all(&forward)
        .await
        .map_err(|e| End::Closed(format!("forwarding CONNECT: {e}")))?;
    Ok((who, up))
}

/// Answers a refused CONNECT with CONNACK `code`.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, code: u8, reason: String) -> End {
    let _ = wr.write_all(&[0x20, 0x02, 0x00, code]).await;
    let _ = wr.flush().await;
    End::Connack(code, reason)
}

/// Checks a user name and password against the user table, then the password file.
async fn authenticate(auth: &Auth, user: &str, password: &[u8]) -> bool {
    if let Some(expected) = auth.users.as_ref().and_then(|u| u.get(user)) {
        return ct_eq_secret(expected.as_bytes(), password);
    }
    let Some(file) = &auth.passwords else {
        return false;
    };
    // PBKDF2 may be configured with many iterations: off the async workers.
    let (file, user, password) = (file.clone(), user.to_string(), password.to_vec());
    tokio::task::spawn_blocking(move || file.verify(&user, &password))
        .await
        .unwrap_or(false)
}

/// Reads more bytes into `buf`, never more than one packet of `max` beyond what is framed.
async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(), End> {
    if buf.len() > max + 5 {
        // Unreachable by construction (frame() bounds a packet), kept as a hard stop.
        return Err(End::Refused(Refusal::TooLarge {
            len: buf.len(),
            max,
        }));
    }
    // Small first read (a CONNECT is usually under 512 bytes), larger once traffic flows.
    buf.reserve(if buf.capacity() == 0 { 512 } else { 8192 });
    match rd.read_buf(buf).await {
        Ok(0) => Err(End::Closed("client closed the connection".into())),
        Ok(_) => Ok(()),
        Err(e) => Err(End::Closed(format!("client→broker: {e}"))),
    }
}

/// Client→broker after CONNECT: frames, checks each packet, forwards the accepted ones in
/// batches. Returns when the client closes or a packet is refused (the packets before it are
/// forwarded first).
async fn relay<R, W>(shared: &Shared, who: &Who, rd: &mut R, up: &mut W, buf: &mut BytesMut) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.cfg.max_packet;
    loop {
        let mut ok = 0;
        let mut refused = None;
        loop {
            match frame(&buf[ok..], max) {
                Ok(Some((header, len))) => {
                    let packet = &buf[ok..ok + header + len];
                    if let Err(r) = inspect(shared.cfg.acl.as_ref(), who, packet, header) {
                        refused = Some(r);
                        break;
                    }
                    ok += header + len;
                }
                Ok(None) => break,
                Err(r) => {
                    refused = Some(r);
                    break;
                }
            }
        }
        if ok > 0 {
            if let Err(e) = up.write_all(&buf[..ok]).await {
                return End::Closed(format!("client→broker: {e}"));
            }
            buf.advance(ok);
        }
        if let Some(r) = refused {
            let _ = up.flush().await;
            return End::Refused(r);
        }
        if let Err(end) = read_more(rd, buf, max).await {
            return end;
        }
    }
}

/// The check of one packet after CONNECT.
fn inspect(acl: Option<&Acl>, who: &Who, packet: &[u8], header: usize) -> Result<(), Refusal> {
    match parse(packet[0], &packet[header..])? {
        Packet::Connect(_) => Err(Refusal::Malformed("second CONNECT")),
        Packet::Publish { topic } => {
            match acl.map(|a| a.check(&who.user, &who.client_id, Action::Write, topic)) {
                Some(Err(reason)) => Err(Refusal::Publish {
                    topic: topic.to_string(),
                    reason,
                }),
                _ => Ok(()),
            }
        }
        Packet::Subscribe { filters } => {
            for f in filters {
                if let Some(Err(reason)) =
                    acl.map(|a| a.check(&who.user, &who.client_id, Action::Read, f))
                {
                    return Err(Refusal::Subscribe {
                        filter: f.to_string(),
                        reason,
                    });
                }
            }
            Ok(())
        }
        Packet::Other => Ok(()),
    }
}
