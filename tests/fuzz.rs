//! Mutation fuzzing of everything a receiver does with untrusted bytes: decode (size, JSON,
//! version, typed parsing, validation), the topic rules of `Incoming::decode`, signature
//! verification, starting from valid signed and unsigned messages of every type; and opening
//! sealed blobs (header, chunks, tags, wrapped keys, the update message naming the blob).
//!
//! No panics allowed, and no altered blob or key may open. CI runs `FEDMQ_FUZZ_ITERS` (default
//! 20,000) inputs per test; the recorded long run is
//! `FEDMQ_FUZZ_ITERS=1000000 cargo test --release --test fuzz -- --nocapture`.

use bytes::Bytes;
use fedmq::crypto::identity::{Identity, Keyring};
use fedmq::crypto::seal::BlobCrypto;
use fedmq::proto::{
    self, BlobRef, Body, Capabilities, Envelope, Failure, Finish, Neighbour, Presence,
    RevealedShare, Role, SaCollect, SaKeys, SaMasked, SaReveal, SaRoster, SaShares, SaUnmask,
    SecAggSetup, Status, Topics, Train, TrainConfig, TrainMetrics, Update,
};
use fedmq::transport::Incoming;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Instant;

fn blob(key: &str) -> BlobRef {
    BlobRef {
        key: key.into(),
        len: 6_653_608,
        sha256: "9e".repeat(32),
        wrapped_key: None,
    }
}

fn corpus(server: &Identity, client: &Identity) -> Vec<(String, Vec<u8>)> {
    let t = Topics::new("run-1");
    let msgs = vec![
        (
            t.status("client-1"),
            Envelope::new(
                "run-1",
                0,
                "client-1",
                Body::Status(Status {
                    state: Presence::Online,
                    role: Role::Client,
                    capabilities: Some(Capabilities {
                        device: "cpu".into(),
                        cores: 2,
                        gpu: None,
                        samples: 6000,
                        version: "0.1.0".into(),
                    }),
                    announce_window_ms: None,
                }),
            ),
        ),
        (
            t.command("client-1"),
            Envelope::new(
                "run-1",
                3,
                "server",
                Body::Train(Train {
                    global: blob("fedmq/run-1/r000003/global"),
                    config: TrainConfig {
                        model: "cnn".into(),
                        epochs: 1,
                        batch_size: 32,
                        optimizer: "adam".into(),
                        learning_rate: 0.001,
                        momentum: 0.9,
                        weight_decay: 0.0,
                        seed: 3,
                    },
                    strategy: None,
                    deadline_ms: 1_763_712_000_000,
                    secagg: None,
                }),
            ),
        ),
        (
            t.up("client-1"),
            Envelope::new(
                "run-1",
                3,
                "client-1",
                Body::Update(Update {
                    update: blob("fedmq/run-1/r000003/updates/client-1"),
                    num_samples: 6000,
                    metrics: TrainMetrics {
                        train_loss: 0.123,
                        train_seconds: 16.5,
                        eval: None,
                    },
                    report: Default::default(),
                }),
            ),
        ),
        (
            t.up("client-1"),
            Envelope::new(
                "run-1",
                3,
                "client-1",
                Body::Failure(Failure {
                    reason: "out of memory".into(),
                }),
            ),
        ),
        (
            t.command("client-1"),
            Envelope::new(
                "run-1",
                10,
                "server",
                Body::Finish(Finish {
                    reason: "completed".into(),
                    final_model: Some(blob("fedmq/run-1/final")),
                }),
            ),
        ),
    ];
    let mut msgs = msgs;
    msgs.extend(secure_messages(&t));
    let mut out = Vec::new();
    for (topic, env) in msgs {
        let json = proto::encode(&env);
        let signer = if env.from == "server" { server } else { client };
        out.push((topic.clone(), signer.seal(json.clone())));
        out.push((topic, json));
    }
    out
}

/// Secure aggregation's stage messages, valid, on their topics.
fn secure_messages(t: &Topics) -> Vec<(String, Envelope)> {
    let pk = |b: u8| format!("{b:02x}").repeat(32);
    let share = "01".repeat(66);
    let setup = SecAggSetup {
        method: "secagg_plus".into(),
        threshold: 6,
        degree: 9,
        selected: 10,
        clip: 1.0,
        bits: 28,
        stage_timeout_ms: 30_000,
        privacy: 0,
        length: 0,
    };
    let light_setup = SecAggSetup {
        method: "lightsecagg".into(),
        threshold: 7,
        privacy: 5,
        length: 1_000_000,
        ..setup.clone()
    };
    let up = |body| {
        (
            t.up("client-1"),
            Envelope::new("run-1", 4, "client-1", body),
        )
    };
    let cmd = |body| {
        (
            t.command("client-1"),
            Envelope::new("run-1", 4, "server", body),
        )
    };
    let mut corpus = vec![
        cmd(Body::Train(Train {
            global: blob("fedmq/run-1/r000004/global"),
            config: TrainConfig {
                model: "lr".into(),
                epochs: 1,
                batch_size: 32,
                optimizer: "sgd".into(),
                learning_rate: 0.03,
                momentum: 0.0,
                weight_decay: 0.0,
                seed: 4,
            },
            strategy: None,
            deadline_ms: 1_763_712_000_000,
            secagg: Some(setup),
        })),
        up(Body::SaKeys(SaKeys {
            cipher_pk: pk(0x11),
            mask_pk: pk(0x22),
            num_samples: 600,
        })),
        cmd(Body::SaRoster(SaRoster {
            neighbours: vec![Neighbour {
                id: "client-2".into(),
                cipher_pk: pk(0x33),
                mask_pk: pk(0x44),
            }],
            weight: 600,
            weight_total: 6000,
        })),
        up(Body::SaShares(SaShares {
            bundle: blob("fedmq/run-1/r000004/shares/client-1"),
        })),
        cmd(Body::SaCollect(SaCollect {
            sharing: vec!["client-2".into()],
            inbox: blob("fedmq/run-1/r000004/inbox/client-1"),
        })),
        up(Body::SaMasked(SaMasked {
            masked: blob("fedmq/run-1/r000004/updates/client-1"),
            num_samples: 600,
            metrics: TrainMetrics {
                train_loss: 0.3,
                train_seconds: 1.0,
                eval: None,
            },
        })),
        cmd(Body::SaUnmask(SaUnmask {
            survivors: vec!["client-2".into()],
            dropped: vec!["client-3".into()],
        })),
        up(Body::SaReveal(SaReveal {
            self_masks: vec![RevealedShare {
                of: "client-2".into(),
                share: share.clone(),
            }],
            mask_keys: vec![RevealedShare {
                of: "client-3".into(),
                share,
            }],
            mask_share: None,
        })),
        // LightSecAgg's reveal: the aggregate mask share's blob.
        up(Body::SaReveal(SaReveal {
            self_masks: vec![],
            mask_keys: vec![],
            mask_share: Some(blob("fedmq/run-1/r000004/reveal/client-1")),
        })),
    ];
    // A LightSecAgg train command.
    let mut light = corpus[0].clone();
    if let Body::Train(t) = &mut light.1.body {
        t.secagg = Some(light_setup);
    }
    corpus.push(light);
    corpus
}

/// Run `run-1`, round 4: every client in `ids` advertises its keys and shares them through
/// `server`. Their sessions, their bundles, and what the server gives each (its inbox).
fn share_all(
    server: &mut fedmq::secagg::ServerSession,
    ids: &[String],
) -> (
    std::collections::BTreeMap<String, fedmq::secagg::ClientSession>,
    std::collections::BTreeMap<String, Vec<u8>>,
    fedmq::secagg::Inboxes,
) {
    let setup = server.setup().clone();
    let mut sessions = std::collections::BTreeMap::new();
    for id in ids {
        let (s, k) = fedmq::secagg::ClientSession::new("run-1", 4, id, &setup, 10).unwrap();
        server.add_keys(id, &k, 10).unwrap();
        sessions.insert(id.clone(), s);
    }
    let rosters = server.rosters().unwrap();
    let mut bundles = std::collections::BTreeMap::new();
    for (id, r) in &rosters {
        let b = sessions
            .get_mut(id)
            .unwrap()
            .on_roster(r, &mut rand::rng())
            .unwrap();
        server
            .add_shares(id, blob(&format!("fedmq/run-1/r000004/shares/{id}")))
            .unwrap();
        server.add_bundle(id, &b).unwrap();
        bundles.insert(id.clone(), b);
    }
    let collects = server.collects().unwrap();
    (sessions, bundles, collects)
}

/// One random mutation of `input` (sometimes spliced with `other`).
fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.random_range(0..4);
    for _ in 0..rounds {
        let len = v.len().max(1);
        match rng.random_range(0..10) {
            0 => {
                let i = rng.random_range(0..len);
                if let Some(b) = v.get_mut(i) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
            1 => {
                let i = rng.random_range(0..len);
                if let Some(b) = v.get_mut(i) {
                    *b = rng.random();
                }
            }
            2 => v.truncate(rng.random_range(0..len)),
            3 => {
                let i = rng.random_range(0..=v.len());
                let n = rng.random_range(1..32);
                let mut extra = vec![0u8; n];
                rng.fill_bytes(&mut extra);
                v.splice(i..i, extra);
            }
            4 => {
                // Interesting JSON tokens where JSON tokens go.
                const TOKENS: &[&str] = &[
                    "null",
                    "-1",
                    "1e309",
                    "NaN",
                    "\"\"",
                    "[]",
                    "{}",
                    "18446744073709551616",
                    "\"\\u0000\"",
                    "\"../../etc\"",
                    "\"+/#\"",
                    "true",
                    "0.0",
                    "-0",
                ];
                let tok = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
                let i = rng.random_range(0..=v.len());
                let j = (i + rng.random_range(0..8)).min(v.len());
                v.splice(i..j, tok.iter().copied());
            }
            5 => {
                // Splice: our head, the other message's tail.
                let i = rng.random_range(0..=v.len());
                let j = rng.random_range(0..=other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            6 => {
                // Duplicate a slice.
                if !v.is_empty() {
                    let i = rng.random_range(0..v.len());
                    let j = rng.random_range(i..v.len().min(i + 64) + 1).min(v.len());
                    let dup = v[i..j].to_vec();
                    v.splice(j..j, dup);
                }
            }
            7 => {
                // A newline and 128 characters: signature-shaped tails.
                v.push(b'\n');
                for _ in 0..128 {
                    v.push(b"0123456789abcdefXYZ\n"[rng.random_range(0..20)]);
                }
            }
            8 => {
                // Huge: past the 64 KiB limit.
                if rng.random_range(0..50) == 0 {
                    v.resize(proto::MAX_MESSAGE_BYTES + rng.random_range(1..100), b' ');
                }
            }
            _ => {
                let n = rng.random_range(0..200);
                v = (0..n).map(|_| rng.random()).collect();
            }
        }
    }
    v
}

#[test]
fn decode_and_verify_never_panic_on_mutated_messages() {
    let (iters, seed) = iters_and_seed();
    let server = Identity::generate("server");
    let client = Identity::generate("client-1");
    let mut ring = Keyring::default();
    ring.trust(&server);
    ring.trust(&client);
    let topics = Topics::new("run-1");
    let corpus = corpus(&server, &client);
    // The unmutated corpus is valid, and the signed copies verify.
    for (topic, bytes) in &corpus {
        let m = Incoming {
            topic: topic.clone(),
            payload: Bytes::from(bytes.clone()),
            retained: false,
        };
        let (_, env) = m.decode(&topics).expect("corpus decodes");
        if fedmq::crypto::identity::split_signed(bytes).1.is_some() {
            ring.verify(&env.from, bytes).expect("corpus verifies");
        }
    }

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut decoded, mut verified) = (0u64, 0u64);
    let start = Instant::now();
    for _ in 0..iters {
        let (topic, base) = &corpus[rng.random_range(0..corpus.len())];
        let other = &corpus[rng.random_range(0..corpus.len())].1;
        let input = mutate(&mut rng, base, other);
        let _ = proto::decode(&input);
        for from in ["server", "client-1", "client-2"] {
            if ring.verify(from, &input).is_ok() {
                verified += 1;
            }
        }
        let m = Incoming {
            topic: topic.clone(),
            payload: Bytes::from(input),
            retained: rng.random(),
        };
        if m.decode(&topics).is_ok() {
            decoded += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"inputs\":{iters},\"seed\":{seed},\"decoded\":{decoded},\"verified\":{verified},\
         \"seconds\":{secs:.1},\"inputs_per_s\":{:.0},\"panics\":0}}",
        iters as f64 / secs.max(1e-9)
    );
}

fn iters_and_seed() -> (u64, u64) {
    let get = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    (get("FEDMQ_FUZZ_ITERS", 20_000), get("FEDMQ_FUZZ_SEED", 1))
}

/// Sealed updates of several sizes (one to three chunks of 64 KiB... up to a few bytes) and the
/// signed update messages naming them: mutating either must never panic, and an altered blob,
/// key or message must never open.
#[test]
fn opening_sealed_blobs_never_panics_and_never_accepts_altered_input() {
    let (iters, seed) = iters_and_seed();
    let server = Arc::new(Identity::generate("server"));
    let client = Arc::new(Identity::generate("client-1"));
    let mut server_ring = Keyring::default();
    server_ring.trust(&client);
    let mut client_ring = Keyring::default();
    client_ring.trust(&server);
    let server_ring = Arc::new(server_ring);
    let at_server = BlobCrypto::new(server.clone(), server_ring.clone());
    let at_client = BlobCrypto::new(client.clone(), Arc::new(client_ring));
    let topics = Topics::new("run-1");

    // (sealed blob, signed update message naming it, the blob reference in it)
    let mut corpus: Vec<(Vec<u8>, Vec<u8>, BlobRef)> = Vec::new();
    for (i, len) in [0usize, 1, 100, 5_000, 70_000].into_iter().enumerate() {
        let plain: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
        let key = format!("fedmq/run-1/r{:06}/up/client-1", i + 1);
        let (sealed, ck) = at_client.seal(&key, &plain);
        let mut r = blob(&key);
        r.len = sealed.len() as u64;
        let r = at_client.wrapped_ref(&r, &ck, "server").unwrap();
        let r_copy = r.clone();
        assert_eq!(
            &at_server.open(&r, Bytes::from(sealed.clone())).unwrap()[..],
            &plain[..]
        );
        let env = Envelope::new(
            "run-1",
            i as u64 + 1,
            "client-1",
            Body::Update(Update {
                update: r,
                num_samples: 10,
                metrics: TrainMetrics::default(),
                report: Default::default(),
            }),
        );
        corpus.push((sealed, client.seal(proto::encode(&env)), r_copy));
    }

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut blob_inputs, mut msg_inputs, mut opened) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    for _ in 0..iters {
        let (sealed, msg, orig) = &corpus[rng.random_range(0..corpus.len())];
        let other = &corpus[rng.random_range(0..corpus.len())];
        let (blob_in, msg_in) = if rng.random_bool(0.5) {
            blob_inputs += 1;
            (mutate(&mut rng, sealed, &other.0), msg.clone())
        } else {
            msg_inputs += 1;
            (sealed.clone(), mutate(&mut rng, msg, &other.1))
        };
        // What the server does: decode and verify the message, then open the blob it names.
        let m = Incoming {
            topic: topics.up("client-1"),
            payload: Bytes::from(msg_in.clone()),
            retained: false,
        };
        let Ok((_, env)) = m.decode(&topics) else {
            continue;
        };
        let Body::Update(u) = env.body else { continue };
        // Opening does not rely on the signature check (done before it in the server): even
        // so, only the very blob under its own key and wrapped key opens.
        let _ = server_ring.verify("client-1", &msg_in);
        let same_ref = u.update.key == orig.key && u.update.wrapped_key == orig.wrapped_key;
        let same_blob = &blob_in == sealed;
        if at_server.open(&u.update, Bytes::from(blob_in)).is_ok() {
            opened += 1;
            assert!(
                same_ref && same_blob,
                "an altered blob or wrapped key opened"
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"inputs\":{iters},\"seed\":{seed},\"blob_inputs\":{blob_inputs},\
         \"message_inputs\":{msg_inputs},\"opened\":{opened},\"seconds\":{secs:.1},\
         \"inputs_per_s\":{:.0},\"panics\":0}}",
        iters as f64 / secs.max(1e-9)
    );
}

/// A secure round between three clients up to the point where client-1 reads its inbox:
/// mutated bundles never panic the server's check, a mutated inbox never panics and never opens
/// unless it still says the same thing (every share is sealed with AES-GCM to its holder),
/// mutated masked blobs never panic, and mutated reveals given to the server's session never
/// panic.
#[test]
fn secure_aggregation_inputs_never_panic_and_altered_shares_never_open() {
    use fedmq::secagg::{self, Params, ServerSession};
    let (iters, seed) = iters_and_seed();
    let ids: Vec<String> = (1..=3).map(|i| format!("client-{i}")).collect();
    let mut server =
        ServerSession::new("run-1", 4, &ids, Params::for_clients(3), 1.0, 7, 16, 1000).unwrap();
    let (mut sessions, bundles, collects) = share_all(&mut server, &ids);
    let me = &ids[0];
    let (sharing, good_inbox) = &collects[me];
    let collect = SaCollect {
        sharing: sharing.clone(),
        inbox: blob("fedmq/run-1/r000004/inbox/client-1"),
    };
    let others: Vec<String> = ids.iter().filter(|i| *i != me).cloned().collect();
    let reveal = proto::encode(&Envelope::new(
        "run-1",
        4,
        "client-2",
        Body::SaReveal(SaReveal {
            self_masks: vec![RevealedShare {
                of: "client-1".into(),
                share: "02".repeat(66),
            }],
            mask_keys: vec![],
            mask_share: None,
        }),
    ));
    let masked = secagg::encode_masked(&[7u32; 16]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut opened, mut parsed, mut bundles_ok) = (0u64, 0u64, 0u64);
    let real = sessions.get_mut(me).unwrap();
    // What an inbox says: its round, holder, and each owner's ciphertext bytes.
    /// An inbox's round, holder, and each owner's ciphertext bytes.
    type Meaning = (String, String, Vec<(String, Vec<u8>)>);
    let meaning = |b: &[u8]| -> Option<Meaning> {
        let v: serde_json::Value = serde_json::from_slice(b).ok()?;
        let entries = v["shares"]
            .as_array()?
            .iter()
            .map(|e| {
                Some((
                    e["from"].as_str()?.to_string(),
                    hex::decode(e["ct"].as_str()?).ok()?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some((
            v["context"].as_str()?.to_string(),
            v["to"].as_str()?.to_string(),
            entries,
        ))
    };
    let good_meaning = meaning(good_inbox);
    for i in 0..iters {
        // The server's check of a bundle: any bytes, never a panic.
        let owner = &ids[rng.random_range(0..ids.len())];
        let holders: Vec<String> = ids.iter().filter(|i| *i != owner).cloned().collect();
        let other = &bundles[&ids[rng.random_range(0..ids.len())]];
        let m = mutate(&mut rng, &bundles[owner], other);
        if secagg::bundle::check_bundle(&m, "run-1|4", owner, &holders).is_ok() {
            bundles_ok += 1;
        }
        // The client's inbox: an altered one opens only if it still says the same thing.
        if i % 2 == 0 {
            let m = mutate(&mut rng, good_inbox, &bundles[&others[0]]);
            let mut probe = real.clone();
            if probe.on_collect(&collect, &m).is_ok() {
                opened += 1;
                assert!(
                    meaning(&m).is_some() && meaning(&m) == good_meaning,
                    "an altered inbox opened: {}",
                    String::from_utf8_lossy(&m)
                );
            }
        }
        if i % 4 == 0 {
            let m = mutate(&mut rng, &masked, &reveal);
            if secagg::decode_masked(&m).is_ok() {
                parsed += 1;
            }
            if let Ok(env) = proto::decode(&mutate(&mut rng, &reveal, &masked)) {
                if let Body::SaReveal(r) = env.body {
                    let _ = server.add_reveal("client-2", &r);
                }
            }
        }
    }
    real.on_collect(&collect, good_inbox)
        .expect("the intact inbox opens");
    println!(
        "{{\"inputs\":{iters},\"seed\":{seed},\"bundles_accepted\":{bundles_ok},\
         \"altered_inboxes_opened_saying_the_same\":{opened},\"masked_blobs_parsed\":{parsed},\
         \"panics\":0}}"
    );
}

/// LightSecAgg between four clients up to client-1's inbox and its aggregate share: mutated
/// bundles never panic the server's check, a mutated inbox never panics and never opens unless
/// its entries are byte for byte the same (each coded share is sealed with AES-GCM to its
/// holder), and mutated aggregate-share blobs never panic the server.
#[test]
fn lightsecagg_inputs_never_panic_and_altered_shares_never_open() {
    use fedmq::secagg::{light, LightParams, Method, ServerSession};
    let (iters, seed) = iters_and_seed();
    let iters = iters / 4;
    let ids: Vec<String> = (1..=4).map(|i| format!("client-{i}")).collect();
    let method = Method::Light(LightParams::for_clients(4));
    let mut server = ServerSession::new("run-1", 4, &ids, method, 1.0, 7, 64, 1000).unwrap();
    let ell = LightParams::for_clients(4).share_len(64);
    let (mut sessions, bundles, collects) = share_all(&mut server, &ids);
    let me = &ids[0];
    let (sharing, good_inbox) = &collects[me];
    let collect = SaCollect {
        sharing: sharing.clone(),
        inbox: blob("fedmq/run-1/r000004/inbox/client-1"),
    };
    let real = sessions.get_mut(me).unwrap();
    let aggregate = light::encode_aggregate(&vec![5u32; ell]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut opened, mut bundles_ok, mut parsed) = (0u64, 0u64, 0u64);
    for i in 0..iters {
        let owner = &ids[rng.random_range(0..ids.len())];
        let holders: Vec<String> = ids.iter().filter(|i| *i != owner).cloned().collect();
        let other = &bundles[&ids[rng.random_range(0..ids.len())]];
        let m = mutate(&mut rng, &bundles[owner], other);
        if light::check_bundle(&m, "run-1|4", owner, &holders, ell).is_ok() {
            bundles_ok += 1;
        }
        if i % 2 == 0 {
            let m = mutate(&mut rng, good_inbox, other);
            let mut probe = real.clone();
            if probe.on_collect(&collect, &m).is_ok() {
                opened += 1;
                // Opened: every sealed entry is intact (only the framing can differ).
                let st = safetensors::SafeTensors::deserialize(&m).expect("it parsed");
                let good = safetensors::SafeTensors::deserialize(good_inbox).unwrap();
                for (name, t) in good.tensors() {
                    assert_eq!(st.tensor(&name).unwrap().data(), t.data(), "{name}");
                }
            }
        }
        if i % 4 == 0 {
            let m = mutate(&mut rng, &aggregate, good_inbox);
            if light::decode_aggregate(&m, ell).is_ok() {
                parsed += 1;
            }
        }
    }
    real.on_collect(&collect, good_inbox)
        .expect("the intact inbox opens");
    println!(
        "{{\"inputs\":{iters},\"seed\":{seed},\"bundles_accepted\":{bundles_ok},\
         \"altered_inboxes_opened_intact\":{opened},\"aggregates_parsed\":{parsed},\"panics\":0}}"
    );
}
