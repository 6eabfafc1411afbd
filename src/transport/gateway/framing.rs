//! Framing and parsing of the client→broker byte stream (MQTT 3.1.1): whole packets bounded by
//! the broker's packet limit, the few packets the gateway reads (CONNECT, PUBLISH, SUBSCRIBE),
//! the CONNECT it forwards to rumqttd with the internal [`Credential`]. Pure functions, no I/O.

use std::fmt;

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
    pub(super) flags: u8,
    pub(super) keep_alive: u16,
    pub(super) client_id: &'a str,
    /// Will topic and message.
    pub(super) will: Option<(&'a str, &'a [u8])>,
    pub(super) user: Option<&'a str>,
    pub(super) password: Option<&'a [u8]>,
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

pub(super) fn valid_filter(filter: &str) -> bool {
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

/// Appends an MQTT length-prefixed string or binary field.
pub(super) fn put_binary(out: &mut Vec<u8>, b: &[u8]) -> Result<(), Refusal> {
    let n = u16::try_from(b.len()).map_err(|_| Refusal::Malformed("field over 65,535 bytes"))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

impl Connect<'_> {
    /// The CONNECT forwarded to rumqttd: the same client settings (clean session, keep-alive,
    /// will), the client id namespaced by `user` (see the module's `Design:` note), and the
    /// internal credential instead of the client's.
    pub(super) fn forward(&self, user: &str, internal: &Credential) -> Result<Vec<u8>, Refusal> {
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
