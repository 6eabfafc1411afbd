//! The authorizing MQTT gateway in front of the embedded rumqttd: authentication (user table,
//! Mosquitto password file, or client certificate), per-topic ACLs in Mosquitto's `acl_file`
//! format, TLS with optional client-certificate verification, and guards against hostile
//! connections. rumqttd 0.20 has none of the first three; this module adds them without changing
//! rumqttd.
//!
//! # Layout
//! - Framing and packets: [`frame`] splits the client→broker byte stream into MQTT 3.1.1
//!   packets (bounded by the broker's packet limit), [`parse`] reads the few packets the
//!   gateway must understand (CONNECT, PUBLISH, SUBSCRIBE) and checks the fixed-header flags of
//!   the others. Pure functions, no I/O (fuzzed by the tests below).
//! - [`Acl`]: Mosquitto's ACL file (`topic`, `user`, `pattern` with `%u`/`%c`, `deny`).
//! - [`PasswordFile`]: Mosquitto's password file (`$7$` PBKDF2-SHA512 and `$6$` SHA-512 hashes,
//!   as `mosquitto_passwd` writes them).
//! - [`spawn`]: the I/O driver: one thread with its own tokio runtime (like rumqttd's own
//!   listener threads), an accept loop, and one task per connection.
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

use bytes::{Buf, BytesMut};
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

// ---------------------------------------------------------------------------------------------
// Framing

/// Why a connection is refused or closed. Each is logged once, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The bytes are not MQTT 3.1.1.
    Malformed(&'static str),
    /// A packet's remaining length exceeds the broker's limit.
    TooLarge {
        /// Announced remaining length.
        len: usize,
        /// The limit (`max_payload_size`).
        max: usize,
    },
    /// The first packet is a CONNECT with another protocol (MQTT 3.1 or 5).
    ProtocolLevel(u8),
    /// The ACL does not allow this PUBLISH.
    Publish {
        /// The topic.
        topic: String,
        /// Which rule refused it.
        reason: &'static str,
    },
    /// The ACL does not allow this SUBSCRIBE filter.
    Subscribe {
        /// The filter.
        filter: String,
        /// Which rule refused it.
        reason: &'static str,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed MQTT 3.1.1: {why}"),
            Self::TooLarge { len, max } => {
                write!(f, "packet of {len} bytes exceeds max_payload_size ({max})")
            }
            Self::ProtocolLevel(l) => {
                write!(
                    f,
                    "protocol level {l} (the gateway speaks MQTT 3.1.1, level 4)"
                )
            }
            Self::Publish { topic, reason } => {
                write!(f, "publish on {topic:?} refused by the ACL: {reason}")
            }
            Self::Subscribe { filter, reason } => {
                write!(f, "subscription to {filter:?} refused by the ACL: {reason}")
            }
        }
    }
}

/// One complete packet at the start of `buf`: `Ok(Some((header_len, remaining_len)))`;
/// `Ok(None)` when more bytes are needed (the expected outcome, not an error). The remaining
/// length is checked against `max` as soon as it is known, before its bytes are read, so a
/// reader never buffers more than `max + 5` bytes per packet.
///
/// # Errors
/// [`Refusal::Malformed`] for a remaining length longer than 4 bytes, [`Refusal::TooLarge`].
pub(crate) fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, Refusal> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(Refusal::TooLarge { len, max });
            }
            let header = 2 + i;
            return Ok((buf.len() >= header + len).then_some((header, len)));
        }
    }
    Err(Refusal::Malformed("remaining length longer than 4 bytes"))
}

/// A reader over a packet's body; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if self.0.len() < n {
            return Err(Refusal::Malformed("packet shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Refusal> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Length-prefixed binary data.
    fn binary(&mut self) -> Result<&'a [u8], Refusal> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// Length-prefixed UTF-8 string without U+0000 (MQTT 3.1.1 section 1.5.3).
    fn string(&mut self) -> Result<&'a str, Refusal> {
        let s = std::str::from_utf8(self.binary()?)
            .map_err(|_| Refusal::Malformed("string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(Refusal::Malformed("string contains U+0000"));
        }
        Ok(s)
    }
}

/// The CONNECT fields the gateway reads and forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connect<'a> {
    /// Connect flags as sent (clean session, will flag/QoS/retain; user/password bits are
    /// replaced when forwarding).
    flags: u8,
    keep_alive: u16,
    client_id: &'a str,
    /// Will topic and message.
    will: Option<(&'a str, &'a [u8])>,
    user: Option<&'a str>,
    password: Option<&'a [u8]>,
}

/// The packets the gateway distinguishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Packet<'a> {
    Connect(Connect<'a>),
    Publish {
        topic: &'a str,
    },
    Subscribe {
        filters: Vec<&'a str>,
    },
    /// PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBSCRIBE, PINGREQ, DISCONNECT: forwarded as they are.
    Other,
}

/// Parses one whole packet (`first` is the fixed header's first byte, `body` the remaining
/// bytes). Types a client never sends (CONNACK, SUBACK, ...) and wrong reserved flags are
/// malformed.
///
/// # Errors
/// [`Refusal::Malformed`], or [`Refusal::ProtocolLevel`] for a CONNECT of another MQTT version.
pub(crate) fn parse(first: u8, body: &[u8]) -> Result<Packet<'_>, Refusal> {
    let flags = first & 0x0f;
    let mut c = Cursor(body);
    match first >> 4 {
        1 => {
            if flags != 0 {
                return Err(Refusal::Malformed("CONNECT with reserved flags set"));
            }
            parse_connect(&mut c).map(Packet::Connect)
        }
        3 => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(Refusal::Malformed("PUBLISH with QoS 3"));
            }
            let topic = c.string()?;
            check_topic_name(topic)?;
            if qos > 0 && c.u16()? == 0 {
                return Err(Refusal::Malformed("PUBLISH with packet id 0"));
            }
            Ok(Packet::Publish { topic })
        }
        8 => {
            if flags != 0x02 {
                return Err(Refusal::Malformed("SUBSCRIBE with wrong reserved flags"));
            }
            if c.u16()? == 0 {
                return Err(Refusal::Malformed("SUBSCRIBE with packet id 0"));
            }
            let mut filters = Vec::new();
            while !c.0.is_empty() {
                let filter = c.string()?;
                check_topic_filter(filter)?;
                if c.u8()? > 2 {
                    return Err(Refusal::Malformed("SUBSCRIBE with QoS above 2"));
                }
                filters.push(filter);
            }
            if filters.is_empty() {
                return Err(Refusal::Malformed("SUBSCRIBE without a topic filter"));
            }
            Ok(Packet::Subscribe { filters })
        }
        4 | 5 | 7 | 12 | 14 if flags == 0 => Ok(Packet::Other),
        6 | 10 if flags == 0x02 => Ok(Packet::Other),
        4..=7 | 10 | 12 | 14 => Err(Refusal::Malformed("wrong reserved flags")),
        _ => Err(Refusal::Malformed(
            "packet type a client may not send (or reserved)",
        )),
    }
}

fn parse_connect<'a>(c: &mut Cursor<'a>) -> Result<Connect<'a>, Refusal> {
    let name = c.binary()?;
    let level = c.u8()?;
    if name == b"MQIsdp" {
        return Err(Refusal::ProtocolLevel(level));
    }
    if name != b"MQTT" {
        return Err(Refusal::Malformed("CONNECT protocol name is not MQTT"));
    }
    if level != 4 {
        return Err(Refusal::ProtocolLevel(level));
    }
    let flags = c.u8()?;
    if flags & 0x01 != 0 {
        return Err(Refusal::Malformed("CONNECT reserved flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    if will_qos == 3 || (!will_flag && flags & 0x38 != 0) {
        return Err(Refusal::Malformed("CONNECT will QoS/retain inconsistent"));
    }
    let has_user = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    if has_password && !has_user {
        return Err(Refusal::Malformed("CONNECT password without user name"));
    }
    let keep_alive = c.u16()?;
    let client_id = c.string()?;
    let will = if will_flag {
        let topic = c.string()?;
        check_topic_name(topic)?;
        Some((topic, c.binary()?))
    } else {
        None
    };
    let user = if has_user { Some(c.string()?) } else { None };
    let password = if has_password {
        Some(c.binary()?)
    } else {
        None
    };
    if !c.0.is_empty() {
        return Err(Refusal::Malformed("CONNECT has trailing bytes"));
    }
    Ok(Connect {
        flags,
        keep_alive,
        client_id,
        will,
        user,
        password,
    })
}

/// A topic name (PUBLISH, will): non-empty, no wildcards.
fn check_topic_name(topic: &str) -> Result<(), Refusal> {
    if topic.is_empty() {
        return Err(Refusal::Malformed("empty topic name"));
    }
    if topic.contains(['+', '#']) {
        return Err(Refusal::Malformed("wildcard in a topic name"));
    }
    Ok(())
}

/// A topic filter: non-empty; `+` and `#` only as whole levels, `#` only last.
fn check_topic_filter(filter: &str) -> Result<(), Refusal> {
    if !valid_filter(filter) {
        return Err(Refusal::Malformed("invalid topic filter"));
    }
    Ok(())
}

fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Appends an MQTT length-prefixed string or binary field.
/// Appends MQTT's variable-length encoding of a packet's remaining length.
pub(crate) fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_binary(out: &mut Vec<u8>, b: &[u8]) -> Result<(), Refusal> {
    let n = u16::try_from(b.len()).map_err(|_| Refusal::Malformed("field over 65,535 bytes"))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

impl Connect<'_> {
    /// The CONNECT forwarded to rumqttd: the same client settings (clean session, keep-alive,
    /// will), the client id namespaced by `user` (see the module's `Design:` note), and the
    /// internal credential instead of the client's.
    fn forward(&self, user: &str, internal: &Credential) -> Result<Vec<u8>, Refusal> {
        let mut body = Vec::with_capacity(64 + self.client_id.len());
        put_binary(&mut body, b"MQTT")?;
        body.push(4);
        body.push((self.flags & 0x3e) | 0xC0);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.client_id.is_empty() {
            put_binary(&mut body, b"")?;
        } else {
            let id = format!("{}:{user}:{}", user.len(), self.client_id);
            put_binary(&mut body, id.as_bytes())?;
        }
        if let Some((topic, message)) = self.will {
            put_binary(&mut body, topic.as_bytes())?;
            put_binary(&mut body, message)?;
        }
        put_binary(&mut body, internal.user.as_bytes())?;
        put_binary(&mut body, internal.password.as_bytes())?;
        let mut packet = Vec::with_capacity(body.len() + 5);
        packet.push(0x10);
        put_remaining_length(&mut packet, body.len());
        packet.extend_from_slice(&body);
        Ok(packet)
    }
}

/// The credential only the gateway knows; rumqttd accepts nothing else.
#[derive(Clone)]
pub(crate) struct Credential {
    pub(crate) user: String,
    pub(crate) password: String,
}

impl Credential {
    /// A fresh random credential.
    pub(crate) fn random() -> Self {
        Self {
            user: "fedmq-gateway".into(),
            password: hex::encode(rand::random::<[u8; 32]>()),
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// ACL

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    topic: String,
}

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// PUBLISH (or a will) on a topic name.
    Write,
    /// SUBSCRIBE to a filter.
    Read,
}

/// A Mosquitto ACL file: `topic [read|write|readwrite|deny] <topic>` lines before any `user`
/// line apply to anonymous clients, after `user <name>` to that user; `pattern [...] <topic>`
/// lines apply to every authenticated client, wherever they stand, with `%u` replaced by its
/// user name and `%c` by its client id. Anything not granted is refused; a matching `deny`
/// refuses even what another line grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    /// Reads and parses an ACL file.
    ///
    /// # Errors
    /// The I/O error or the first bad line, as a message naming the file and line.
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of an ACL file.
    ///
    /// # Errors
    /// `line N: reason` for the first line that is not a comment, blank, `user`, `topic` or
    /// `pattern` line with a valid topic filter.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
            let (keyword, rest) = line
                .split_once(char::is_whitespace)
                .map(|(k, r)| (k, r.trim()))
                .unwrap_or((line, ""));
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(bad("`user` without a name"));
                    }
                    user = Some(rest.to_string());
                    acl.users.entry(rest.to_string()).or_default();
                }
                "topic" | "pattern" => {
                    let (access, topic) = match rest.split_once(char::is_whitespace) {
                        Some(("read", t)) => (Access::Read, t.trim()),
                        Some(("write", t)) => (Access::Write, t.trim()),
                        Some(("readwrite", t)) => (Access::ReadWrite, t.trim()),
                        Some(("deny", t)) => (Access::Deny, t.trim()),
                        _ => (Access::ReadWrite, rest),
                    };
                    if !valid_filter(topic) {
                        return Err(bad("not a valid MQTT topic filter"));
                    }
                    let rule = Rule {
                        access,
                        topic: topic.to_string(),
                    };
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else if let Some(u) = &user {
                        acl.users.entry(u.clone()).or_default().push(rule);
                    } else {
                        acl.anonymous.push(rule);
                    }
                }
                _ => return Err(bad("expected `user`, `topic` or `pattern`")),
            }
        }
        Ok(acl)
    }

    /// Whether any `topic` line applies to anonymous clients (the gateway admits none, so such
    /// lines grant nothing; Mosquitto applies them only with `allow_anonymous true`).
    pub(crate) fn has_anonymous_rules(&self) -> bool {
        !self.anonymous.is_empty()
    }

    /// Whether `user` (connected as `client_id`) may do `action` on `topic` (a topic name for
    /// [`Action::Write`], a filter for [`Action::Read`]: every topic the filter can match must be
    /// readable).
    ///
    /// # Errors
    /// The reason for the refusal.
    pub(crate) fn check(
        &self,
        user: &str,
        client_id: &str,
        action: Action,
        topic: &str,
    ) -> Result<(), &'static str> {
        let own = self.users.get(user).map(Vec::as_slice).unwrap_or(&[]);
        let patterns = self
            .patterns
            .iter()
            .filter_map(|r| substitute(&r.topic, user, client_id).map(|t| (r.access, t)));
        let rules: Vec<(Access, std::borrow::Cow<'_, str>)> = own
            .iter()
            .map(|r| (r.access, std::borrow::Cow::Borrowed(r.topic.as_str())))
            .chain(patterns.map(|(a, t)| (a, std::borrow::Cow::Owned(t))))
            .collect();
        let denied = rules.iter().any(|(a, t)| {
            *a == Access::Deny
                && match action {
                    Action::Write => covers(t, topic),
                    Action::Read => overlaps(t, topic),
                }
        });
        if denied {
            return Err("a deny line matches");
        }
        let granted = rules.iter().any(|(a, t)| {
            let allows = match action {
                Action::Write => matches!(a, Access::Write | Access::ReadWrite),
                Action::Read => matches!(a, Access::Read | Access::ReadWrite),
            };
            allows && covers(t, topic)
        });
        if granted {
            Ok(())
        } else {
            Err(match action {
                Action::Write => "no line grants write access",
                Action::Read => "no line grants read access to every topic the filter matches",
            })
        }
    }
}

/// A pattern with `%u` and `%c` replaced; `None` (the pattern grants nothing) when a value it
/// needs is empty or contains a wildcard, which would widen the pattern.
fn substitute(pattern: &str, user: &str, client_id: &str) -> Option<String> {
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['+', '#']);
    if (pattern.contains("%u") && unsafe_value(user))
        || (pattern.contains("%c") && unsafe_value(client_id))
    {
        return None;
    }
    Some(pattern.replace("%u", user).replace("%c", client_id))
}

/// Whether ACL filter `acl` covers every topic that `filter` matches (for a topic name: whether
/// `acl` matches it). `#` covers the remaining levels (and the parent level, as in MQTT), `+`
/// any one level including a `+` of `filter`, a literal only the same literal. Wildcards at the
/// first level do not cover topics starting with `$` (MQTT 3.1.1 section 4.7.2).
pub(crate) fn covers(acl: &str, filter: &str) -> bool {
    let a: Vec<&str> = acl.split('/').collect();
    let f: Vec<&str> = filter.split('/').collect();
    if f[0].starts_with('$') && (a[0] == "+" || a[0] == "#") {
        return false;
    }
    for (i, level) in a.iter().enumerate() {
        if *level == "#" {
            return true;
        }
        let Some(other) = f.get(i) else {
            return false;
        };
        let ok = match *level {
            "+" => *other != "#",
            lit => lit == *other,
        };
        if !ok {
            return false;
        }
    }
    a.len() == f.len()
}

/// Whether two filters can match a common topic (for `deny` lines against a subscription).
fn overlaps(x: &str, y: &str) -> bool {
    let a: Vec<&str> = x.split('/').collect();
    let b: Vec<&str> = y.split('/').collect();
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&"#"), _) | (_, Some(&"#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if *p == "+" || *q == "+" || p == q => i += 1,
            _ => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Passwords

#[derive(Clone, PartialEq, Eq)]
enum Hash {
    /// `$6$<salt>$<hash>`: SHA-512(password ‖ salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// A Mosquitto password file (`mosquitto_passwd`): `user:$7$<iterations>$<salt>$<hash>`
/// (PBKDF2-HMAC-SHA512, base64 salt and hash; Mosquitto 2.0's default) or `user:$6$<salt>$<hash>`
/// (SHA-512 of password then salt; Mosquitto 1.x).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PasswordFile {
    entries: HashMap<String, Hash>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&String> = self.entries.keys().collect();
        users.sort();
        f.debug_struct("PasswordFile")
            .field("users", &users)
            .finish_non_exhaustive()
    }
}

/// A `$7$` entry that no password matches: unknown users cost as much as known ones.
static DUMMY_SALT: [u8; 12] = [0x5a; 12];

impl PasswordFile {
    /// Reads and parses a password file.
    ///
    /// # Errors
    /// The I/O error or the first bad line (the line's user name, never its hash).
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a password file. Blank lines and lines starting with `#` are skipped.
    ///
    /// # Errors
    /// `line N: reason`; unsupported formats (plain-text passwords, Mosquitto 2.1's argon2id)
    /// are named.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut entries = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected `user:hash`", n + 1));
            };
            let bad = |why: &str| format!("line {} (user {user:?}): {why}", n + 1);
            let fields: Vec<&str> = hash.split('$').collect();
            let b64 = |s: &str| base64_decode(s).ok_or_else(|| bad("bad base64"));
            let parsed =
                match fields.as_slice() {
                    ["", "6", salt, h] => Hash::Sha512 {
                        salt: b64(salt)?,
                        hash: b64(h)?,
                    },
                    ["", "7", iterations, salt, h] => Hash::Pbkdf2 {
                        iterations: iterations
                            .parse::<NonZeroU32>()
                            .map_err(|_| bad("bad iteration count"))?,
                        salt: b64(salt)?,
                        hash: b64(h)?,
                    },
                    _ => return Err(bad(
                        "unsupported hash (expected $6$ or $7$ as written by mosquitto_passwd; \
                         plain-text passwords must be hashed with mosquitto_passwd -U)",
                    )),
                };
            if matches!(&parsed, Hash::Sha512 { hash, .. } | Hash::Pbkdf2 { hash, .. } if hash.is_empty())
            {
                return Err(bad("empty hash"));
            }
            if entries.insert(user.to_string(), parsed).is_some() {
                return Err(bad("user listed twice"));
            }
        }
        Ok(Self { entries })
    }

    /// Whether the file lists `user`.
    pub(crate) fn contains(&self, user: &str) -> bool {
        self.entries.contains_key(user)
    }

    /// Whether `password` is `user`'s. Constant time in the password; an unknown user costs a
    /// default PBKDF2 too. CPU-bound (PBKDF2 iterations): call from a blocking context.
    pub(crate) fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.entries.get(user) {
            Some(Hash::Sha512 { salt, hash }) => {
                use sha2::Digest;
                let mut h = sha2::Sha512::new();
                h.update(password);
                h.update(salt);
                ct_eq(&h.finalize(), hash)
            }
            Some(Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            }) => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            None => {
                let mut out = [0u8; 64];
                ring::pbkdf2::derive(
                    ring::pbkdf2::PBKDF2_HMAC_SHA512,
                    NonZeroU32::new(101).unwrap_or(NonZeroU32::MIN),
                    &DUMMY_SALT,
                    password,
                    &mut out,
                );
                false
            }
        }
    }
}

/// Equality in time independent of where the inputs differ (lengths are not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Equality of two secrets of possibly different lengths, in time independent of both.
fn ct_eq_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    ct_eq(&sha2::Sha256::digest(a), &sha2::Sha256::digest(b))
}

/// Standard base64 (RFC 4648, `+/`, `=` padding optional); `None` for anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot end a valid encoding.
    (bits < 6).then_some(out)
}

// ---------------------------------------------------------------------------------------------
// Client certificates

/// The subject Common Name of a DER certificate; `None` when absent, repeated, not a string
/// type, or the DER is malformed. Input is a certificate rustls has already verified.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    /// (tag, content, rest) of the DER element at the start of `b`.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
            b = &b[n..];
            len
        };
        if b.len() < len {
            return None;
        }
        Some((tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    // version [0] (optional), serial, signature algorithm, issuer, validity, then subject.
    let mut skip = if tbs.first() == Some(&0xA0) { 5 } else { 4 };
    while skip > 0 {
        tbs = tlv(tbs)?.2;
        skip -= 1;
    }
    let (0x30, mut rdns, _) = tlv(tbs)? else {
        return None;
    };
    let mut found = None;
    while !rdns.is_empty() {
        let (0x31, mut set, rest) = tlv(rdns)? else {
            return None;
        };
        rdns = rest;
        while !set.is_empty() {
            let (0x30, attr, rest) = tlv(set)? else {
                return None;
            };
            set = rest;
            let (0x06, oid, value) = tlv(attr)? else {
                return None;
            };
            if oid == [0x55, 0x04, 0x03] {
                let (tag, v, _) = tlv(value)?;
                // UTF8String, PrintableString, TeletexString (as Latin-1 subset), IA5String.
                if !matches!(tag, 0x0C | 0x13 | 0x14 | 0x16) || found.is_some() {
                    return None;
                }
                found = Some(std::str::from_utf8(v).ok()?.to_string());
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// I/O driver

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn fedmq_acl() -> Acl {
        Acl::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl")).unwrap()
    }

    #[test]
    fn framing_needs_bytes_and_bounds_the_length() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0xC0, 0x00], 100), Ok(Some((2, 0))));
        assert_eq!(frame(&[0x30, 0x03, 1, 2], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x03, 1, 2, 3, 9], 100), Ok(Some((2, 3))));
        // 200 = 0xC8 0x01.
        assert_eq!(
            frame(&[0x30, 0xC8, 0x01], 100),
            Err(Refusal::TooLarge { len: 200, max: 100 })
        );
        assert_eq!(frame(&[0x30, 0xC8, 0x01], 1000), Ok(None));
        assert!(matches!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(Refusal::Malformed(_))
        ));
    }

    fn connect_bytes(
        level: u8,
        client_id: &str,
        will: Option<&str>,
        login: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        put_binary(&mut body, b"MQTT").unwrap();
        body.push(level);
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04 | 0x08 | 0x20;
        }
        if login.is_some() {
            flags |= 0xC0;
        }
        body.push(flags);
        body.extend_from_slice(&30u16.to_be_bytes());
        put_binary(&mut body, client_id.as_bytes()).unwrap();
        if let Some(t) = will {
            put_binary(&mut body, t.as_bytes()).unwrap();
            put_binary(&mut body, b"offline").unwrap();
        }
        if let Some((u, p)) = login {
            put_binary(&mut body, u.as_bytes()).unwrap();
            put_binary(&mut body, p.as_bytes()).unwrap();
        }
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn connect_is_parsed_and_forwarded_with_the_internal_credential() {
        let raw = connect_bytes(
            4,
            "client-1",
            Some("fedmq/v1/r/status/client-1"),
            Some(("client-1", "pw")),
        );
        let Ok(Packet::Connect(c)) = parse(raw[0], &raw[2..]) else {
            panic!()
        };
        assert_eq!(c.client_id, "client-1");
        assert_eq!(c.user, Some("client-1"));
        assert_eq!(c.password, Some(&b"pw"[..]));
        assert_eq!(c.keep_alive, 30);
        let cred = Credential {
            user: "gw".into(),
            password: "secret".into(),
        };
        let fwd = c.forward("client-1", &cred).unwrap();
        let (h, l) = frame(&fwd, 1 << 20).unwrap().unwrap();
        assert_eq!(h + l, fwd.len());
        let Ok(Packet::Connect(f)) = parse(fwd[0], &fwd[h..]) else {
            panic!()
        };
        assert_eq!(f.client_id, "8:client-1:client-1");
        assert_eq!(f.user, Some("gw"));
        assert_eq!(f.password, Some(&b"secret"[..]));
        assert_eq!(
            (f.flags & 0x3e),
            (c.flags & 0x3e),
            "clean session and will kept"
        );
        assert_eq!(f.will, c.will);
        assert_eq!(f.keep_alive, 30);
        // MQTT 5 and 3.1 are answered with "unacceptable protocol level".
        let v5 = connect_bytes(5, "x", None, None);
        assert_eq!(parse(v5[0], &v5[2..]), Err(Refusal::ProtocolLevel(5)));
    }

    #[test]
    fn publish_and_subscribe_are_parsed_and_reserved_flags_checked() {
        let mut p = vec![];
        put_binary(&mut p, b"a/b").unwrap();
        p.extend_from_slice(&[0, 1, b'x']);
        assert_eq!(parse(0x32, &p), Ok(Packet::Publish { topic: "a/b" }));
        assert!(parse(0x36, &p).is_err(), "QoS 3");
        let mut w = vec![];
        put_binary(&mut w, b"a/+").unwrap();
        assert!(parse(0x30, &w).is_err(), "wildcard in a topic name");
        let mut s = vec![0, 7];
        put_binary(&mut s, b"a/#").unwrap();
        s.push(1);
        put_binary(&mut s, b"b/+/c").unwrap();
        s.push(0);
        assert_eq!(
            parse(0x82, &s),
            Ok(Packet::Subscribe {
                filters: vec!["a/#", "b/+/c"]
            })
        );
        assert!(parse(0x80, &s).is_err());
        let mut bad = vec![0, 7];
        put_binary(&mut bad, b"a/#/b").unwrap();
        bad.push(0);
        assert!(parse(0x82, &bad).is_err());
        assert_eq!(parse(0xC0, &[]), Ok(Packet::Other));
        assert_eq!(parse(0x62, &[0, 1]), Ok(Packet::Other));
        assert!(parse(0x60, &[0, 1]).is_err());
        assert!(parse(0x20, &[0, 0]).is_err(), "CONNACK from a client");
    }

    #[test]
    fn coverage_of_filters_by_acl_entries() {
        assert!(covers("a/+/c", "a/b/c"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/+/#"));
        assert!(covers("#", "x/y"));
        assert!(!covers("#", "$SYS/x"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(!covers("a/b/c", "a/b"));
        assert!(overlaps("a/+", "a/b/#"));
        assert!(overlaps("a/#", "a"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/b", "a/b/c"));
    }

    #[test]
    fn the_shipped_acl_keeps_participants_on_their_topics() {
        let acl = fedmq_acl();
        let w = |u: &str, c: &str, t: &str| acl.check(u, c, Action::Write, t).is_ok();
        let r = |u: &str, c: &str, t: &str| acl.check(u, c, Action::Read, t).is_ok();
        assert!(w("client-1", "client-1", "fedmq/v1/run/up/client-1"));
        assert!(!w("client-1", "client-1", "fedmq/v1/run/up/client-2"));
        assert!(!w("client-1", "client-1", "fedmq/v1/run/cmd/client-2"));
        assert!(w("client-1", "client-1", "fedmq/v1/run/status/client-1"));
        assert!(!w("client-1", "client-1", "fedmq/v1/run/status/server"));
        assert!(r("client-1", "client-1", "fedmq/v1/run/cmd/client-1"));
        assert!(r("client-1", "client-1", "fedmq/v1/+/cmd/client-1"));
        assert!(!r("client-1", "client-1", "fedmq/v1/run/cmd/client-2"));
        assert!(!r("client-1", "client-1", "fedmq/v1/run/cmd/+"));
        assert!(!r("client-1", "client-1", "#"));
        assert!(r("server", "server", "fedmq/v1/run/up/+"));
        assert!(r("server", "server", "fedmq/v1/+/status/+"));
        assert!(w("server", "server", "fedmq/v1/run/cmd/client-9"));
        assert!(w("server", "server", "fedmq/v1/run/status/server"));
        assert!(!w("server", "server", "fedmq/v1/run/up/client-1"));
        // A user name with a wildcard does not widen the patterns.
        assert!(!r("+", "x", "fedmq/v1/run/cmd/client-1"));
        assert!(!r("#", "x", "fedmq/v1/run/cmd/client-1"));
    }

    #[test]
    fn acl_syntax_deny_anonymous_and_client_id_patterns() {
        let acl = Acl::parse(
            "# comment\n\ntopic read public/#\nuser alice\ntopic a/#\ntopic deny a/secret\n\
             pattern write dev/%c/out\n",
        )
        .unwrap();
        assert!(acl.has_anonymous_rules());
        assert!(acl.check("bob", "b", Action::Read, "public/x").is_err());
        assert!(acl.check("alice", "x", Action::Write, "a/b").is_ok());
        assert!(acl.check("alice", "x", Action::Write, "a/secret").is_err());
        assert!(
            acl.check("alice", "x", Action::Read, "a/#").is_err(),
            "deny overlaps"
        );
        assert!(acl.check("bob", "d1", Action::Write, "dev/d1/out").is_ok());
        assert!(acl.check("bob", "", Action::Write, "dev//out").is_err());
        assert!(Acl::parse("topic read a/#/b").is_err());
        assert!(Acl::parse("topics read a").unwrap_err().contains("line 1"));
        assert!(Acl::parse("user").is_err());
    }

    #[test]
    fn mosquitto_password_hashes_verify() {
        // Written by mosquitto_passwd 2.0.11 (`-b`, and `-H sha512 -b`).
        let file = PasswordFile::parse(
            "alice:$7$101$uTjqACn57yfyh8Tn$5yuEnKVQvVyphS7sEKEK8qiy+GkndNnWV4IGxaUC3nuykZJlSeha9O3oaOC/C5/tw9Uwo+Q8DAzWwj4uWlkCxw==\n\
             bob:$6$4vNRlY6SJB8o1/cw$zZ5o4Qbc9Q4X/ZG+ZHrK+iCNEvD4Ye8XcTo5LL4AkivMrg5171Jz9U342lJd3kwmwkIcnK3ZDsoacBUzI9Aaag==\n",
        )
        .unwrap();
        assert!(file.verify("alice", b"s3cret"));
        assert!(!file.verify("alice", b"s3cret "));
        assert!(file.verify("bob", b"pw"));
        assert!(!file.verify("bob", b"s3cret"));
        assert!(!file.verify("carol", b"pw"));
        assert!(!format!("{file:?}").contains("$7$"));
        assert!(PasswordFile::parse("x:plain")
            .unwrap_err()
            .contains("mosquitto_passwd"));
        assert!(PasswordFile::parse("x:$7$0$AA$AA").is_err());
    }

    #[test]
    fn base64_round_trips_known_vectors() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert!(base64_decode("Z").is_none());
        assert!(base64_decode("Zm9v!").is_none());
    }

    #[test]
    fn common_name_of_generated_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::crypto::tls::CertsPlan::new(dir.path(), vec!["client-1".into()]);
        crate::crypto::tls::generate_certs(&plan).unwrap();
        for id in ["client-1", "broker"] {
            let cert =
                crate::crypto::tls::load_certs(&dir.path().join(format!("{id}.pem")), "c").unwrap();
            assert_eq!(common_name(cert[0].as_ref()).as_deref(), Some(id));
        }
        assert_eq!(common_name(b"\x30\x03\x30\x01"), None);
    }

    #[test]
    fn only_failures_drain_an_address_budget() {
        let l = RateLimiter::new(FailureBudget {
            burst: 3,
            per_second: 10.0,
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        assert!(!l.abusive(&ip, t), "connections alone cost nothing");
        assert_eq!(l.charge(ip, t), (false, false));
        assert_eq!(l.charge(ip, t), (false, false));
        assert_eq!(
            l.charge(ip, t),
            (true, true),
            "third failure exhausts it, logged"
        );
        assert_eq!(l.charge(ip, t), (true, false), "logged once per episode");
        assert!(l.abusive(&ip, t));
        assert!(!l.abusive(&"10.0.0.2".parse().unwrap(), t));
        assert!(!l.abusive(&ip, t + Duration::from_millis(150)), "refilled");
    }

    /// Random and mutated byte streams through framing, parsing and the ACL: no panics.
    #[test]
    fn parser_survives_random_and_mutated_input() {
        let acl = fedmq_acl();
        let who = Who {
            user: "client-1".into(),
            client_id: "client-1".into(),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seeds: Vec<Vec<u8>> = vec![connect_bytes(
            4,
            "client-1",
            Some("fedmq/v1/r/status/client-1"),
            Some(("u", "p")),
        )];
        let mut p = vec![0x32, 0];
        put_binary(&mut p, b"fedmq/v1/r/up/client-1").unwrap();
        p.extend_from_slice(&[0, 1, b'{', b'}']);
        p[1] = (p.len() - 2) as u8;
        seeds.push(p);
        let mut s = vec![0x82, 0, 0, 1];
        put_binary(&mut s, b"fedmq/v1/+/cmd/client-1").unwrap();
        s.push(1);
        s[1] = (s.len() - 2) as u8;
        seeds.push(s);
        let cred = Credential::random();
        // Packets that parsed, and that passed the ACL: the mutations reach the deep paths.
        let (mut parsed, mut allowed) = (0usize, 0usize);
        for i in 0..200_000 {
            let stream: Vec<u8> = if i % 3 == 0 {
                let n = rng.random_range(0..64);
                (0..n).map(|_| rng.random()).collect()
            } else {
                let mut b = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..4) {
                    match rng.random_range(0..3) {
                        0 if !b.is_empty() => {
                            let j = rng.random_range(0..b.len());
                            b[j] = rng.random();
                        }
                        1 if !b.is_empty() => {
                            b.truncate(rng.random_range(0..b.len()));
                        }
                        _ => b.push(rng.random()),
                    }
                }
                b
            };
            let mut rest = &stream[..];
            while let Ok(Some((h, l))) = frame(rest, 1024) {
                let packet = &rest[..h + l];
                let p = parse(packet[0], &packet[h..]);
                parsed += usize::from(p.is_ok());
                if let Ok(Packet::Connect(c)) = p {
                    let _ = c.forward("client-1", &cred);
                    if let Some((t, _)) = c.will {
                        let _ = acl.check("client-1", c.client_id, Action::Write, t);
                    }
                }
                allowed += usize::from(inspect(Some(&acl), &who, packet, h).is_ok());
                rest = &rest[h + l..];
            }
            let _ = common_name(&stream);
            if let Ok(text) = std::str::from_utf8(&stream) {
                let _ = Acl::parse(text);
                let _ = PasswordFile::parse(text);
                let _ = base64_decode(text);
            }
        }
        assert!(
            parsed > 20_000 && allowed > 10_000,
            "{parsed} parsed, {allowed} allowed"
        );
    }
}
