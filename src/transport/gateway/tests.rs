//! Unit tests of the gateway: framing and parsing, ACLs, password hashes, certificate names,
//! failure budgets, and a mutation fuzzer over all of them.

use super::acl::{covers, overlaps};
use super::framing::put_binary;
use super::passwords::base64_decode;
use super::*;
use rand::{Rng, SeedableRng};
use std::path::Path;

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
