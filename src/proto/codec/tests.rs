use super::*;
use crate::proto::*;
use proptest::prelude::*;

fn blob(key: &str) -> BlobRef {
    BlobRef {
        key: key.into(),
        len: 4096,
        sha256: "ab".repeat(32),
        wrapped_key: None,
    }
}

fn samples() -> Vec<Envelope> {
    let train = Train {
        global: blob("fedmq/run-1/r000001/global"),
        config: TrainConfig {
            model: "cnn".into(),
            epochs: 1,
            batch_size: 32,
            optimizer: "sgd".into(),
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 7,
        },
        strategy: None,
        deadline_ms: 1_700_000_000_000,
        secagg: None,
    };
    vec![
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
        Envelope::new("run-1", 1, "server", Body::Train(train)),
        Envelope::new(
            "run-1",
            1,
            "client-1",
            Body::Update(Update {
                update: blob("fedmq/run-1/r000001/updates/client-1"),
                num_samples: 6000,
                metrics: TrainMetrics {
                    train_loss: 0.25,
                    train_seconds: 3.5,
                    eval: None,
                },
                report: Default::default(),
            }),
        ),
        Envelope::new(
            "run-1",
            1,
            "client-2",
            Body::Failure(Failure {
                reason: "out of memory".into(),
            }),
        ),
        Envelope::new(
            "run-1",
            9,
            "server",
            Body::Finish(Finish {
                reason: "completed".into(),
                final_model: Some(blob("fedmq/run-1/final")),
            }),
        ),
    ]
}

#[test]
fn every_message_type_round_trips() {
    for m in samples() {
        let bytes = encode(&m);
        assert_eq!(
            decode(&bytes).unwrap(),
            m,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

#[test]
fn wire_form_matches_protocol_doc() {
    let m = &samples()[3];
    let v: serde_json::Value = serde_json::from_slice(&encode(m)).unwrap();
    assert_eq!(v["v"], 1);
    assert_eq!(v["body"]["type"], "failure");
    assert_eq!(v["id"].as_str().unwrap().len(), 16);
    // A message written by hand, as a non-Rust client would, decodes.
    let hand = br#"{"v":1,"run":"run-1","round":2,"id":"m1","from":"dev-9","ts_ms":5,
        "body":{"type":"update","update":{"key":"p/run-1/r000002/updates/dev-9","len":10,
        "sha256":"0000000000000000000000000000000000000000000000000000000000000000"},
        "num_samples":3,"metrics":{"train_loss":0.5,"train_seconds":1.0},"extra":"ignored"}}"#;
    assert!(matches!(decode(hand).unwrap().body, Body::Update(_)));
}

#[test]
fn rejections_have_reasons() {
    let good = encode(&samples()[1]);
    let text = String::from_utf8(good).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![b' '; MAX_MESSAGE_BYTES + 1], "exceeds"),
        (b"hello".to_vec(), "not a JSON object"),
        (b"[1,2]".to_vec(), "not a JSON object"),
        (
            br#"{"run":"x"}"#.to_vec(),
            "missing or non-integer protocol version",
        ),
        (
            br#"{"v":"1"}"#.to_vec(),
            "missing or non-integer protocol version",
        ),
        (
            text.replacen("\"v\":1", "\"v\":2", 1).into_bytes(),
            "unsupported protocol version 2",
        ),
        (
            text.replacen("\"train\"", "\"trian\"", 1).into_bytes(),
            "unknown variant `trian`",
        ),
        (
            text.replacen("\"run\":\"run-1\"", "\"run\":\"run/+\"", 1)
                .into_bytes(),
            "field `run`",
        ),
        (text.replacen("abab", "ABAB", 1).into_bytes(), "sha256"),
        (
            text.replacen("r000001/global", "../global", 1).into_bytes(),
            "clean object key",
        ),
        (
            text.replacen("\"epochs\":1", "\"epochs\":0", 1)
                .into_bytes(),
            "epochs",
        ),
        (
            text.replacen("\"round\":1", "\"round\":-1", 1).into_bytes(),
            "malformed",
        ),
    ];
    for (bytes, want) in cases {
        let err = decode(&bytes).unwrap_err().to_string();
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
}

#[test]
fn deep_nesting_is_rejected_not_overflowed() {
    let mut s = String::from(r#"{"v":1,"x":"#);
    s.push_str(&"[".repeat(100_000));
    assert!(decode(s.as_bytes()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..5,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = encode(&samples()[which]);
        for (pos, byte, op) in edits {
            let len = bytes.len().max(1);
            match op {
                0 => { let i = pos % len; if i < bytes.len() { bytes[i] = byte; } }
                1 => { let i = pos % (bytes.len() + 1); bytes.insert(i, byte); }
                _ => { bytes.truncate(pos % len); }
            }
        }
        if let Ok(m) = decode(&bytes) {
            // Whatever decodes must be valid and re-encode to something that decodes the same.
            prop_assert!(m.validate().is_ok());
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }
}
