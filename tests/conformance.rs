//! `docs/PROTOCOL.md` against the code: the page is parsed here, and every JSON example, every
//! table that mirrors code (topics, blob keys, models, data sets) and every test vector is checked
//! with the crate's public API. The vectors were computed independently of this crate
//! (`tests/vectors/gen_vectors.py`, Python `cryptography`), so the Rust code opening them shows that
//! the page is enough to interoperate with it. Nothing is duplicated here: change a value in the
//! page and a test here fails.

use bytes::Bytes;
use curve25519_dalek::montgomery::MontgomeryPoint;
use fedmq::crypto::identity::{self, Identity, IdentityError, Keyring};
use fedmq::crypto::seal::{self, BlobCrypto, SealError};
use fedmq::data::DatasetKind;
use fedmq::proto::{
    self, BlobKeys, BlobRef, Body, DecodeError, Envelope, RevealedShare, SaKeys, SaReveal, Topics,
};
use fedmq::secagg::{
    self,
    agree::KeyPair,
    field::Fp,
    mask::{self, Sign},
    quantize::Quantizer,
    shamir::{self, ShamirError, Share},
    Params, ServerSession,
};
use fedmq::server::Checkpoint;
use fedmq::tensor::{NamedTensor, ParamSet};
use fedmq::train::{init_params, ModelKind};
use fedmq::transport::Incoming;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");
/// The sample run, round and client the page's examples and tables use.
const RUN: &str = "local";
const ROUND: u64 = 4;
const CLIENT: &str = "client-3";
const KINDS: [&str; 5] = ["status", "train", "update", "failure", "finish"];

// ---------------------------------------------------------------------------------------------
// Reading the page
// ---------------------------------------------------------------------------------------------

fn doc() -> String {
    std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("{DOC}: {e}"))
}

/// A fenced code block of the page.
#[derive(Debug)]
struct Block {
    /// The info string after the opening fence (`json`, `text`).
    lang: String,
    /// The lines between the fences, joined with `\n` (no trailing newline).
    body: String,
    /// The last heading above the block.
    heading: String,
    /// 1-based line of the opening fence (for messages).
    line: usize,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut open: Option<(String, usize, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut open {
            Some((lang, start, lines)) => {
                if line.trim_start().starts_with("```") {
                    out.push(Block {
                        lang: std::mem::take(lang),
                        body: lines.join("\n"),
                        heading: heading.clone(),
                        line: *start,
                    });
                    open = None;
                } else {
                    lines.push(line);
                }
            }
            None => {
                if let Some(info) = line.trim_start().strip_prefix("```") {
                    open = Some((info.trim().to_string(), i + 1, Vec::new()));
                } else if line.starts_with('#') {
                    heading = line.to_string();
                }
            }
        }
    }
    assert!(open.is_none(), "{DOC}: unclosed code block");
    out
}

/// The text of the section starting at the heading line `title` up to the next heading of the
/// same or a higher level.
fn section(text: &str, title: &str) -> String {
    let level = title.chars().take_while(|&c| c == '#').count();
    let mut lines = text.lines().skip_while(|l| *l != title);
    assert!(lines.next().is_some(), "{DOC}: no section {title:?}");
    let mut in_code = false;
    let mut out = Vec::new();
    for line in lines {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !in_code && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        out.push(line);
    }
    out.join("\n")
}

/// The rows of the Markdown table whose header line starts with `header`, as trimmed cells.
fn table(text: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(header));
    assert!(
        lines.next().is_some(),
        "{DOC}: no table starting {header:?}"
    );
    lines
        .skip(1) // |---|---|
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// A cell's text without its backticks.
fn code(cell: &str) -> &str {
    cell.trim().trim_matches('`')
}

/// `[10, 784]` → `[10, 784]` as numbers.
fn shape(cell: &str) -> Vec<usize> {
    let inner = code(cell).trim_start_matches('[').trim_end_matches(']');
    inner
        .split(',')
        .map(|d| {
            d.trim()
                .parse()
                .unwrap_or_else(|e| panic!("shape {cell:?}: {e}"))
        })
        .collect()
}

/// The `label: value` fields of the `text` blocks under a `####` heading of "Test vectors"; a
/// hex value may continue on the following lines.
fn vector_fields(title: &str) -> BTreeMap<String, String> {
    let text = section(&doc(), "## Test vectors");
    let sec = section(&text, title);
    let mut fields = BTreeMap::new();
    let mut last: Option<String> = None;
    for b in blocks(&sec).into_iter().filter(|b| b.lang == "text") {
        for line in b.body.lines() {
            let line = line.trim();
            match line.split_once(':') {
                Some((label, value))
                    if label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || " -_()".contains(c)) =>
                {
                    let prev = fields.insert(label.to_string(), value.trim().to_string());
                    assert!(prev.is_none(), "{title}: field {label:?} twice");
                    last = Some(label.to_string());
                }
                _ => {
                    let label = last
                        .as_ref()
                        .unwrap_or_else(|| panic!("{title}: text before any label: {line:?}"));
                    assert!(
                        line.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{title}: continuation of {label:?} is not hex: {line:?}"
                    );
                    if let Some(v) = fields.get_mut(label) {
                        v.push_str(line);
                    }
                }
            }
        }
    }
    assert!(!fields.is_empty(), "{title}: no fields");
    fields
}

fn field<'a>(fields: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    fields.get(name).unwrap_or_else(|| {
        panic!(
            "test vector field {name:?} missing; have {:?}",
            fields.keys()
        )
    })
}

fn hex_field(fields: &BTreeMap<String, String>, name: &str) -> Vec<u8> {
    hex::decode(field(fields, name)).unwrap_or_else(|e| panic!("field {name:?}: {e}"))
}

fn hex32(fields: &BTreeMap<String, String>, name: &str) -> [u8; 32] {
    hex_field(fields, name)
        .try_into()
        .unwrap_or_else(|v: Vec<u8>| panic!("field {name:?}: {} bytes, expected 32", v.len()))
}

// ---------------------------------------------------------------------------------------------
// Crypto helpers, written from the page (ring, curve25519-dalek), independent of fedmq::crypto::seal
// ---------------------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn hkdf32(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 of 32 bytes");
    out
}

/// The page's blob AEAD key.
fn blob_aead_key(ikm: &[u8; 32], header: &[u8], object_key: &str) -> [u8; 32] {
    hkdf32(
        ikm,
        &header[24..56],
        &[b"fedmq/v1 blob", &header[8..9], object_key.as_bytes()],
    )
}

/// Opens chunk `i` of a sealed blob with the page's nonce and associated data.
fn open_chunk(key: &[u8; 32], header: &[u8], i: u64, last: bool, sealed_chunk: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, key).expect("AES-256 key"));
    let mut nonce = [0u8; 12];
    nonce[0] = u8::from(last);
    nonce[4..].copy_from_slice(&i.to_be_bytes());
    let mut buf = sealed_chunk.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header),
            &mut buf,
        )
        .unwrap_or_else(|_| panic!("chunk {i} does not open with the page's construction"));
    plain.to_vec()
}

// ---------------------------------------------------------------------------------------------
// Identities of the test vectors, loaded through fedmq's own key files
// ---------------------------------------------------------------------------------------------

struct Keys {
    _dir: tempfile::TempDir,
    client: Arc<Identity>,
    server: Arc<Identity>,
    /// Every public key of the vectors (client-3 and server).
    ring: Keyring,
}

fn keys() -> Keys {
    let ids = vector_fields("#### Identities");
    let dir = tempfile::tempdir().expect("temp dir");
    for who in [CLIENT, "server"] {
        std::fs::write(
            dir.path().join(format!("{who}.key")),
            field(&ids, &format!("{who} seed")),
        )
        .expect("write key");
        std::fs::write(
            dir.path().join(format!("{who}.pub")),
            format!("{}\n", field(&ids, &format!("{who} public key"))),
        )
        .expect("write pub");
    }
    let load = |who: &str| {
        Arc::new(
            Identity::load(&dir.path().join(format!("{who}.key")), who)
                .unwrap_or_else(|e| panic!("{who}: {e}")),
        )
    };
    Keys {
        client: load(CLIENT),
        server: load("server"),
        ring: Keyring::load_dir(dir.path()).expect("keyring"),
        _dir: dir,
    }
}

/// `me`'s blob crypto, trusting the other participant only (as the page's keyrings).
fn crypto(keys: &Keys, me: &Arc<Identity>) -> BlobCrypto {
    let mut ring = Keyring::default();
    let other = if me.id() == CLIENT {
        &keys.server
    } else {
        &keys.client
    };
    ring.trust(other);
    BlobCrypto::new(me.clone(), Arc::new(ring))
}

// ---------------------------------------------------------------------------------------------
// JSON examples
// ---------------------------------------------------------------------------------------------

/// The topic an example message travels on.
fn topic_of(env: &Envelope, topics: &Topics) -> String {
    match env.body {
        Body::Status(_) => topics.status(&env.from),
        Body::Train(_)
        | Body::Finish(_)
        | Body::SaRoster(_)
        | Body::SaCollect(_)
        | Body::SaUnmask(_) => topics.command(CLIENT),
        Body::Update(_)
        | Body::Failure(_)
        | Body::SaKeys(_)
        | Body::SaShares(_)
        | Body::SaMasked(_)
        | Body::SaReveal(_) => topics.up(&env.from),
    }
}

/// Adds an unknown field to `obj` (receivers must ignore it).
fn with_extra(mut v: serde_json::Value) -> serde_json::Value {
    v["x_future_field"] = serde_json::json!({"nested": [1, 2.5, "x"]});
    if let Some(body) = v.get_mut("body") {
        body["x_future_field"] = serde_json::json!(true);
    }
    v
}

#[test]
fn every_json_example_decodes_with_the_rust_decoder() {
    let text = doc();
    let examples: Vec<Block> = blocks(&text)
        .into_iter()
        .filter(|b| b.lang == "json")
        .collect();
    let mut kinds_seen = BTreeSet::new();
    let mut checkpoints = 0;
    for b in &examples {
        let at = format!("{DOC}:{} (under {:?})", b.line, b.heading);
        let value: serde_json::Value =
            serde_json::from_str(&b.body).unwrap_or_else(|e| panic!("{at}: not JSON: {e}"));
        assert!(value.is_object(), "{at}: not a JSON object");
        if value.get("body").is_some() {
            let env = proto::decode(b.body.as_bytes())
                .unwrap_or_else(|e| panic!("{at}: the Rust decoder refuses it: {e}"));
            let kind = env.body.kind();
            // Under a "### `train` ..." heading, the example is a train message.
            if let Some(named) = KINDS
                .iter()
                .find(|k| b.heading.starts_with(&format!("### `{k}`")))
            {
                assert_eq!(kind, *named, "{at}: example of the wrong type");
            }
            kinds_seen.insert(kind);
            // The topic rules: the example is valid on its own topic.
            let topics = Topics::new(&env.run);
            let incoming = Incoming {
                topic: topic_of(&env, &topics),
                payload: Bytes::from(b.body.clone().into_bytes()),
                retained: false,
            };
            let (_, checked) = incoming
                .decode(&topics)
                .unwrap_or_else(|e| panic!("{at}: refused on its topic: {e}"));
            assert_eq!(checked, env);
            // Unknown fields are ignored.
            let extra = serde_json::to_vec(&with_extra(value.clone())).expect("JSON");
            assert_eq!(
                proto::decode(&extra).unwrap_or_else(|e| panic!("{at}: with an extra field: {e}")),
                env,
                "{at}"
            );
            // Blob keys follow the key scheme.
            let keys = BlobKeys::new(fedmq::federation::KEY_PREFIX, &env.run);
            match &env.body {
                Body::Train(t) => assert_eq!(t.global.key, keys.global(env.round), "{at}"),
                Body::Update(u) => {
                    assert_eq!(u.update.key, keys.update(env.round, &env.from), "{at}")
                }
                Body::Finish(f) => {
                    if let Some(m) = &f.final_model {
                        assert_eq!(m.key, keys.final_model(), "{at}");
                    }
                }
                Body::SaShares(sh) => {
                    assert_eq!(sh.bundle.key, keys.shares(env.round, &env.from), "{at}")
                }
                Body::SaMasked(m) => {
                    assert_eq!(m.masked.key, keys.update(env.round, &env.from), "{at}")
                }
                Body::SaCollect(c) => {
                    assert_eq!(c.inbox.key, keys.inbox(env.round, CLIENT), "{at}")
                }
                Body::Status(_)
                | Body::Failure(_)
                | Body::SaKeys(_)
                | Body::SaRoster(_)
                | Body::SaUnmask(_)
                | Body::SaReveal(_) => {}
            }
        } else if value.get("strategy").is_some() {
            let cp: Checkpoint = serde_json::from_str(&b.body)
                .unwrap_or_else(|e| panic!("{at}: not a Checkpoint: {e}"));
            cp.model
                .validate("model")
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            let keys = BlobKeys::new(fedmq::federation::KEY_PREFIX, &cp.run);
            assert!(
                cp.model.key == keys.global(cp.round + 1) || cp.model.key == keys.final_model(),
                "{at}: a checkpoint names the global model of the next round or the final model"
            );
            checkpoints += 1;
        } else {
            panic!("{at}: a json example must be a message (with `body`) or a checkpoint");
        }
    }
    for k in KINDS {
        assert!(kinds_seen.contains(k), "no JSON example of a `{k}` message");
    }
    assert_eq!(checkpoints, 1, "one checkpoint example");
}

/// The number rules of "Messages" and "Receiving rules", on the page's first example.
#[test]
fn stated_decoding_rules_hold() {
    let text = doc();
    let first = blocks(&text)
        .into_iter()
        .find(|b| b.lang == "json")
        .expect("a json example");
    let base: serde_json::Value = serde_json::from_str(&first.body).expect("JSON");
    let decode = |v: &serde_json::Value| proto::decode(&serde_json::to_vec(v).expect("JSON"));
    let mut v = base.clone();
    v["v"] = serde_json::json!(2);
    assert!(matches!(
        decode(&v),
        Err(DecodeError::UnsupportedVersion { got: 2 })
    ));
    let mut v = base.clone();
    v["round"] = serde_json::json!(4.0);
    assert!(
        matches!(decode(&v), Err(DecodeError::Malformed(_))),
        "4.0 is not an integer"
    );
    let mut v = base.clone();
    v["body"]["type"] = serde_json::json!("hello");
    assert!(matches!(decode(&v), Err(DecodeError::Malformed(_))));
    let mut v = base.clone();
    v["from"] = serde_json::json!("client/3");
    assert!(matches!(decode(&v), Err(DecodeError::Invalid(_))));
    let big = vec![b' '; proto::MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        proto::decode(&big),
        Err(DecodeError::TooLarge { .. })
    ));
    // The constants the page states.
    assert_eq!(proto::MAX_MESSAGE_BYTES, 65_536);
    assert!(text.contains("at most 65,536 bytes"));
    assert_eq!(identity::SIGNATURE_HEX_LEN, 128);
    assert_eq!(identity::MAX_CLOCK_SKEW.as_secs(), 300);
    assert!(text.contains("more than 300 s from its clock"));
    assert_eq!(seal::HEADER_LEN, 56);
    assert_eq!(seal::TAG_LEN, 16);
    assert_eq!(seal::WRAPPED_KEY_HEX_LEN, 160);
    assert_eq!(
        seal::sealed_len(6_654_088),
        6_654_088 + 56 + 16 * 7,
        "sealed adds 56 + 16 × ⌈len / 2^20⌉"
    );
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

#[test]
fn topic_table_matches_topics() {
    let text = doc();
    let t = Topics::new(RUN);
    let rows = table(&text, "| topic |");
    let mut got = BTreeSet::new();
    for row in &rows {
        let built = code(&row[0])
            .replace("<run>", RUN)
            .replace("<participant>", CLIENT)
            .replace("<client>", CLIENT);
        assert_eq!(built, code(&row[1]), "example column of {:?}", row[0]);
        got.insert(built);
    }
    let want: BTreeSet<String> = [t.status(CLIENT), t.command(CLIENT), t.up(CLIENT)].into();
    assert_eq!(got, want);
    // The subscriptions named under the table.
    for (filter, built) in [
        ("`fedmq/v1/<run>/up/+`", t.up_all()),
        ("`fedmq/v1/<run>/status/+`", t.status_all()),
        ("`fedmq/v1/<run>/status/server`", t.status("server")),
    ] {
        assert!(text.contains(filter), "the page names {filter}");
        assert_eq!(code(filter).replace("<run>", RUN), built);
    }
    assert_eq!(fedmq::server::SERVER_ID, "server");
    assert_eq!(fedmq::client::client_id(3), CLIENT, "rank N is client-N");
}

#[test]
fn key_table_matches_blob_keys() {
    let text = doc();
    assert_eq!(fedmq::federation::KEY_PREFIX, "fedmq");
    assert!(text.contains("`<prefix>` is `fedmq`"));
    let keys = BlobKeys::new(fedmq::federation::KEY_PREFIX, RUN);
    let fill = |template: &str| {
        template
            .replace("<prefix>", fedmq::federation::KEY_PREFIX)
            .replace("<run>", RUN)
            .replace("<round:06>", &format!("{ROUND:06}"))
            .replace("<client>", CLIENT)
    };
    let rows = table(&text, "| key |");
    let mut got = BTreeSet::new();
    for row in &rows {
        let built = fill(code(&row[0]));
        assert_eq!(built, code(&row[1]), "example column of {:?}", row[0]);
        got.insert(built);
    }
    let want: BTreeSet<String> = [
        keys.global(ROUND),
        keys.update(ROUND, CLIENT),
        keys.shares(ROUND, CLIENT),
        keys.inbox(ROUND, CLIENT),
        keys.reveal(ROUND, CLIENT),
        keys.checkpoint(ROUND),
        keys.checkpoint_state(ROUND),
        keys.final_model(),
    ]
    .into();
    assert_eq!(got, want);
    assert!(text.contains("`<prefix>/<run>/r<round:06>/`"));
    assert_eq!(
        fill("<prefix>/<run>/r<round:06>/"),
        keys.round_prefix(ROUND)
    );
    assert!(text.contains("`<prefix>/<run>/r<round:06>/updates/<from>`"));
}

/// Evaluates a shape of the "general" column (`[K, C·H·W]`, `[512, 64·⌊H/4⌋·⌊W/4⌋]`).
fn general_shape(cell: &str, c: usize, h: usize, w: usize, k: usize) -> Vec<usize> {
    let inner = code(cell).trim_start_matches('[').trim_end_matches(']');
    inner
        .split(',')
        .map(|dim| {
            dim.trim()
                .split('·')
                .map(|f| match f {
                    "C" => c,
                    "H" => h,
                    "W" => w,
                    "K" => k,
                    "⌊H/4⌋" => h / 4,
                    "⌊W/4⌋" => w / 4,
                    n => n
                        .parse()
                        .unwrap_or_else(|e| panic!("{cell:?}: factor {n:?}: {e}")),
                })
                .product()
        })
        .collect()
}

#[test]
fn model_tables_match_param_specs_and_blob_lengths() {
    let text = doc();
    let rows = table(&text, "| model | tensor |");
    let mut by_model: BTreeMap<String, Vec<&Vec<String>>> = BTreeMap::new();
    for row in &rows {
        by_model
            .entry(code(&row[0]).to_string())
            .or_default()
            .push(row);
    }
    let names: BTreeSet<&str> = by_model.keys().map(String::as_str).collect();
    assert_eq!(names, ModelKind::NAMES.into_iter().collect());
    // Column → (sample shape, classes); the last is an odd shape for the general column.
    let shapes: [([usize; 3], usize); 3] = [([1, 28, 28], 10), ([3, 32, 32], 10), ([2, 9, 13], 7)];
    for kind in ModelKind::ALL {
        let rows = &by_model[kind.name()];
        for (col, (sample, classes)) in shapes.iter().enumerate() {
            let specs = kind
                .param_specs(sample, *classes)
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
            let want: Vec<(String, Vec<usize>)> =
                specs.into_iter().map(|s| (s.name, s.shape)).collect();
            let got: Vec<(String, Vec<usize>)> = rows
                .iter()
                .map(|r| {
                    let [c, h, w] = *sample;
                    let s = if col < 2 {
                        shape(&r[2 + col])
                    } else {
                        general_shape(&r[4], c, h, w, *classes)
                    };
                    (code(&r[1]).to_string(), s)
                })
                .collect();
            assert_eq!(got, want, "{kind}, sample {sample:?}, {classes} classes");
        }
    }
    let sizes = table(&text, "| model | parameters, MNIST |");
    assert_eq!(sizes.len(), ModelKind::ALL.len());
    for row in &sizes {
        let kind: ModelKind = code(&row[0]).parse().expect("model name");
        for (i, sample) in [[1, 28, 28], [3, 32, 32]].iter().enumerate() {
            let params = init_params(kind, sample, 10, 0).expect("init");
            let n: usize = params.iter().map(|t| t.len()).sum();
            let len = params.to_safetensors_bytes().len();
            let cell = |j: usize| -> usize { row[j].parse().expect("number") };
            assert_eq!(cell(1 + 2 * i), n, "{kind} {sample:?}: parameters");
            assert_eq!(cell(2 + 2 * i), len, "{kind} {sample:?}: blob bytes");
        }
    }
}

#[test]
fn data_set_table_matches_data_kinds() {
    let text = doc();
    let rows = table(&text, "| data set");
    let mut seen = BTreeSet::new();
    for row in &rows {
        let kind: DatasetKind = code(&row[0]).parse().expect("data set name");
        assert_eq!(code(&row[0]), kind.name(), "the page uses FedML's names");
        assert_eq!(shape(&row[1]), kind.sample_shape().to_vec(), "{kind}");
        assert_eq!(
            row[2].parse::<usize>().ok(),
            Some(kind.num_classes()),
            "{kind}"
        );
        let floats = |cell: &str| -> Vec<f32> {
            code(cell)
                .split(',')
                .map(|x| x.trim().parse().expect("number"))
                .collect()
        };
        assert_eq!(floats(&row[3]), kind.mean(), "{kind}: mean");
        assert_eq!(floats(&row[4]), kind.std(), "{kind}: std");
        seen.insert(kind.name());
    }
    assert_eq!(
        seen,
        DatasetKind::ALL
            .into_iter()
            .filter(|k| k.is_image())
            .map(DatasetKind::name)
            .collect(),
        "the table lists every image set"
    );
}

// ---------------------------------------------------------------------------------------------
// Test vectors
// ---------------------------------------------------------------------------------------------

#[test]
fn identities_derive_as_stated() {
    let ids = vector_fields("#### Identities");
    let k = keys();
    for (who, id) in [(CLIENT, &k.client), ("server", &k.server)] {
        let seed = hex32(&ids, &format!("{who} seed"));
        assert_eq!(id.public_hex(), field(&ids, &format!("{who} public key")));
        let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
        let scalar = hex32(&ids, &format!("{who} x25519 secret"));
        assert_eq!(sk.to_scalar_bytes(), scalar, "{who}: SHA-512(seed)[0..32]");
        let x_pub = hex32(&ids, &format!("{who} x25519 public"));
        assert_eq!(sk.verifying_key().to_montgomery().to_bytes(), x_pub);
        assert_eq!(MontgomeryPoint::mul_base_clamped(scalar).to_bytes(), x_pub);
        // Key files as `fedmq keys` writes them: 64 hex digits and a newline.
        let dir = tempfile::tempdir().expect("temp dir");
        let (key_file, pub_file) = id.save(dir.path()).expect("save");
        assert_eq!(
            std::fs::read_to_string(key_file).expect("read"),
            format!("{}\n", hex::encode(seed))
        );
        assert_eq!(
            std::fs::read_to_string(pub_file).expect("read"),
            format!("{}\n", field(&ids, &format!("{who} public key")))
        );
    }
    assert_eq!(
        k.ring.ids().collect::<Vec<_>>(),
        vec![CLIENT, "server"],
        "a keyring is the .pub files of a directory"
    );
}

#[test]
fn store_credentials_derive_as_stated() {
    let v = vector_fields("#### E. A participant's store credential");
    let c = fedmq::store::access::StoreCredential::for_participant(
        field(&v, "store secret"),
        field(&v, "access key"),
    );
    assert_eq!(c.access_key, field(&v, "access key"));
    assert_eq!(c.secret_key, field(&v, "secret"));
}

/// Vector A's payload: the block's lines joined by `\n`.
fn vector_a() -> Vec<u8> {
    let text = section(&doc(), "## Test vectors");
    let sec = section(&text, "#### A. A signed message");
    let b = blocks(&sec)
        .into_iter()
        .find(|b| b.lang == "text")
        .expect("vector A block");
    b.body.into_bytes()
}

#[test]
fn vector_a_verifies_and_the_rust_signer_writes_the_same_bytes() {
    let payload = vector_a();
    let k = keys();
    let (json, sig) = identity::split_signed(&payload);
    assert_eq!(
        sig.map(<[u8]>::len),
        Some(128),
        "JSON, newline, 128 hex digits"
    );
    assert_eq!(payload[json.len()], b'\n');
    assert_eq!(
        k.client.seal(json.to_vec()),
        payload,
        "Ed25519 is deterministic"
    );
    k.ring.verify(CLIENT, &payload).expect("signature verifies");
    assert!(matches!(
        k.ring.verify("server", &payload),
        Err(IdentityError::BadSignature(_))
    ));
    let mut altered = payload.clone();
    altered[10] ^= 1;
    assert!(k.ring.verify(CLIENT, &altered).is_err());

    let env = proto::decode(&payload).expect("a signed message decodes");
    assert!(matches!(env.body, Body::Update(_)));
    assert_eq!(env.from, CLIENT);
    assert_eq!(proto::encode(&env), json, "what fedmq's encoder writes");
    let topics = Topics::new(RUN);
    let incoming = Incoming {
        topic: topics.up(CLIENT),
        payload: Bytes::from(payload.clone()),
        retained: false,
    };
    let (_, checked) = incoming.decode(&topics).expect("valid on its topic");
    // Retained or not, the signature checks out (the live age check is the clock's business).
    k.ring
        .check_message(&payload, true, &checked)
        .expect("signed by client-3");
}

fn vector_a_update() -> BlobRef {
    match proto::decode(&vector_a()).expect("vector A").body {
        Body::Update(u) => u.update,
        other => panic!("vector A is not an update: {other:?}"),
    }
}

#[test]
fn vector_b_opens_for_the_server_only() {
    let f = vector_fields("#### B. A sealed update, wrapped to the server");
    let ids = vector_fields("#### Identities");
    let k = keys();
    let key = field(&f, "object key");
    let sealed = hex_field(&f, "sealed");
    let plain = hex_field(&f, "plaintext");
    let blob = vector_a_update();
    assert_eq!(blob.key, key);
    assert_eq!(blob.len as usize, sealed.len());
    assert_eq!(
        field(&f, "sealed length").parse::<usize>().ok(),
        Some(sealed.len())
    );
    assert_eq!(sha256_hex(&sealed), field(&f, "sealed sha256"));
    assert_eq!(blob.sha256, field(&f, "sealed sha256"));
    assert_eq!(blob.wrapped_key.as_deref(), Some(field(&f, "wrapped key")));
    assert_eq!(seal::sealed_len(plain.len()), sealed.len());

    // fedmq opens what Python sealed and wrapped.
    let server = crypto(&k, &k.server);
    let opened = server
        .open(&blob, Bytes::from(sealed.clone()))
        .unwrap_or_else(|e| panic!("the server cannot open vector B: {e}"));
    assert_eq!(&opened[..], &plain[..]);
    // ... and it is the safetensors blob fedmq writes for these tensors.
    let params = ParamSet::from_safetensors_bytes(&plain).expect("safetensors");
    let want = ParamSet::new(vec![
        NamedTensor::new("fc.weight", vec![1, 2], vec![1.0, -2.0]).expect("tensor"),
        NamedTensor::new("fc.bias", vec![1], vec![0.5]).expect("tensor"),
    ])
    .expect("set");
    assert_eq!(params, want);
    assert_eq!(want.to_safetensors_bytes(), plain);
    assert_eq!(u64::from_le_bytes(plain[..8].try_into().expect("8")), 128);

    // Nobody else opens it, nor the same bytes under another key.
    let client = crypto(&k, &k.client);
    assert!(matches!(
        client.open(&blob, Bytes::from(sealed.clone())),
        Err(SealError::Unwrap { .. })
    ));
    let moved = BlobRef {
        key: "fedmq/local/r000004/updates/client-4".into(),
        ..blob.clone()
    };
    assert!(server.open(&moved, Bytes::from(sealed.clone())).is_err());

    // The intermediate values, recomputed from the page's construction.
    let header = &sealed[..seal::HEADER_LEN];
    assert_eq!(&header[..8], b"fedmqSB1");
    assert_eq!(header[8], 1, "mode 1");
    assert_eq!(header[9], 20, "chunk_log2 20");
    assert_eq!(&header[24..56], &hex_field(&f, "salt")[..]);
    let ck = hex32(&f, "content key");
    let aead_key = blob_aead_key(&ck, header, key);
    assert_eq!(aead_key, hex32(&f, "blob aead key"));
    assert_eq!(open_chunk(&aead_key, header, 0, true, &sealed[56..]), plain);
    let eph = hex32(&f, "ephemeral secret");
    let e_pub = MontgomeryPoint::mul_base_clamped(eph).to_bytes();
    assert_eq!(e_pub, hex32(&f, "ephemeral public"));
    let wrapped = hex_field(&f, "wrapped key");
    assert_eq!(wrapped.len(), 80);
    assert_eq!(&wrapped[..32], &e_pub[..], "E ‖ C");
    let r = hex32(&f, "reader public");
    assert_eq!(r, hex32(&ids, "server x25519 public"));
    let shared = MontgomeryPoint(r).mul_clamped(eph).to_bytes();
    assert_eq!(shared, hex32(&f, "shared secret"));
    assert_eq!(
        MontgomeryPoint(e_pub)
            .mul_clamped(hex32(&ids, "server x25519 secret"))
            .to_bytes(),
        shared,
        "the reader's side of the exchange"
    );
    let mut salt = e_pub.to_vec();
    salt.extend_from_slice(&r);
    let kek = hkdf32(&shared, &salt, &[b"fedmq/v1 key wrap", key.as_bytes()]);
    assert_eq!(kek, hex32(&f, "kek"));
    let chacha = LessSafeKey::new(UnboundKey::new(&aead::CHACHA20_POLY1305, &kek).expect("key"));
    let mut c = wrapped[32..].to_vec();
    let unwrapped = chacha
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(key.as_bytes()),
            &mut c,
        )
        .expect("C opens with the kek");
    assert_eq!(unwrapped, &ck[..]);
}

#[test]
fn vector_c_opens_with_the_servers_own_key() {
    let f = vector_fields("#### C. A blob sealed with the server's own key");
    let ids = vector_fields("#### Identities");
    let k = keys();
    let key = field(&f, "object key");
    let sealed = hex_field(&f, "sealed");
    let plain = hex_field(&f, "plaintext");
    assert_eq!(plain, br#"{"round":4}"#);
    let opened = crypto(&k, &k.server)
        .open_own(key, Bytes::from(sealed.clone()))
        .unwrap_or_else(|e| panic!("the server cannot open vector C: {e}"));
    assert_eq!(&opened[..], &plain[..]);
    assert!(crypto(&k, &k.client)
        .open_own(key, Bytes::from(sealed.clone()))
        .is_err());
    let header = &sealed[..seal::HEADER_LEN];
    assert_eq!(header[8], 2, "mode 2");
    assert_eq!(&header[24..56], &hex_field(&f, "salt")[..]);
    let aead_key = blob_aead_key(&hex32(&ids, "server seed"), header, key);
    assert_eq!(aead_key, hex32(&f, "blob aead key"));
    assert_eq!(open_chunk(&aead_key, header, 0, true, &sealed[56..]), plain);
}

#[test]
fn vector_d_opens_across_two_chunks() {
    let f = vector_fields("#### D. Two chunks, wrapped to a client");
    let k = keys();
    let path = Path::new(VECTORS).join("sealed-two-chunks.bin");
    let sealed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        field(&f, "sealed length").parse::<usize>().ok(),
        Some(sealed.len())
    );
    assert_eq!(sha256_hex(&sealed), field(&f, "sealed sha256"));
    let header = &sealed[..seal::HEADER_LEN];
    assert_eq!(header, &hex_field(&f, "header")[..]);
    let n: usize = field(&f, "plaintext length").parse().expect("number");
    let plain: Vec<u8> = (0..n).map(|i| (31 * i % 251) as u8).collect();
    let chunk = 1usize << header[9];
    assert_eq!(chunk, 65_536);
    assert_eq!(
        &sealed[56 + chunk..56 + chunk + 16],
        &hex_field(&f, "chunk 0 tag")[..]
    );
    assert_eq!(
        &sealed[sealed.len() - 16..],
        &hex_field(&f, "chunk 1 tag")[..]
    );

    let key = field(&f, "object key");
    let blob = BlobRef {
        key: key.to_string(),
        len: sealed.len() as u64,
        sha256: sha256_hex(&sealed),
        wrapped_key: Some(field(&f, "wrapped key").to_string()),
    };
    blob.validate("vector D").expect("a valid blob reference");
    let opened = crypto(&k, &k.client)
        .open(&blob, Bytes::from(sealed.clone()))
        .unwrap_or_else(|e| panic!("client-3 cannot open vector D: {e}"));
    assert_eq!(&opened[..], &plain[..]);

    // The page's nonces, chunk by chunk.
    let aead_key = blob_aead_key(&hex32(&f, "content key"), header, key);
    let c0 = &sealed[56..56 + chunk + 16];
    let c1 = &sealed[56 + chunk + 16..];
    assert_eq!(open_chunk(&aead_key, header, 0, false, c0), &plain[..chunk]);
    assert_eq!(open_chunk(&aead_key, header, 1, true, c1), &plain[chunk..]);
    let eph = hex32(&f, "ephemeral secret");
    assert_eq!(
        &hex_field(&f, "wrapped key")[..32],
        &MontgomeryPoint::mul_base_clamped(eph).to_bytes()[..]
    );
}

// ---------------------------------------------------------------------------------------------
// Secure aggregation vectors (F to J)
// ---------------------------------------------------------------------------------------------

/// The clients of the secure-aggregation vectors.
const SA_CLIENTS: [&str; 3] = ["client-1", "client-2", "client-3"];

fn num<T: std::str::FromStr>(fields: &BTreeMap<String, String>, name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    field(fields, name)
        .parse()
        .unwrap_or_else(|e| panic!("field {name:?}: {e:?}"))
}

/// A field holding a comma-separated list of numbers.
fn list<T: std::str::FromStr>(fields: &BTreeMap<String, String>, name: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    field(fields, name)
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("field {name:?}, {v:?}: {e:?}"))
        })
        .collect()
}

fn share_field(fields: &BTreeMap<String, String>, name: &str) -> Share {
    let bytes = hex_field(fields, name);
    let share = Share::from_bytes(&bytes).unwrap_or_else(|e| panic!("field {name:?}: {e}"));
    assert_eq!(
        share.to_bytes().to_vec(),
        bytes,
        "{name}: re-encodes identically"
    );
    share
}

/// The pairwise mask context of the vectors' round.
fn mask_ctx() -> String {
    format!("mask|{}", secagg::context(RUN, ROUND))
}

/// `|got − want|` within a couple of `f32` roundings (the page does not fix the order of the
/// `f64` operations of unmasking, only that the result is an `f32`).
fn assert_f32_close(got: f32, want: f32, what: &str) {
    let tol = 2.0 * f32::EPSILON * want.abs().max(1.0);
    assert!((got - want).abs() <= tol, "{what}: {got} != {want}");
}

#[test]
fn vector_f_pairwise_mask_seed_agrees_from_both_sides() {
    let f = vector_fields("#### F. A pairwise mask seed");
    let (sk1, sk2) = (
        hex32(&f, "client-1 mask secret"),
        hex32(&f, "client-2 mask secret"),
    );
    let (a, b) = (KeyPair::from_secret(sk1), KeyPair::from_secret(sk2));
    assert_eq!(a.secret(), &sk1, "kept unclamped, as generated");
    assert_eq!(a.public(), hex32(&f, "client-1 mask public"));
    assert_eq!(b.public(), hex32(&f, "client-2 mask public"));
    let ctx = mask_ctx();
    assert_eq!(ctx, field(&f, "context"));
    let seed = a.pairwise_seed(&b.public(), ctx.as_bytes()).expect("agree");
    assert_eq!(seed, hex32(&f, "seed"));
    assert_eq!(
        b.pairwise_seed(&a.public(), ctx.as_bytes()).expect("agree"),
        seed,
        "both ends derive the same seed"
    );
    // The page's construction, recomputed with curve25519-dalek and ring.
    let shared = MontgomeryPoint(b.public()).mul_clamped(sk1).to_bytes();
    assert_eq!(shared, hex32(&f, "shared secret"));
    assert_eq!(
        MontgomeryPoint(a.public()).mul_clamped(sk2).to_bytes(),
        shared
    );
    let (lo, hi) = if a.public() <= b.public() {
        (a.public(), b.public())
    } else {
        (b.public(), a.public())
    };
    let salt = [lo, hi].concat();
    assert_eq!(
        hkdf32(
            &shared,
            &salt,
            &[b"fedmq/v1 secagg pairwise", ctx.as_bytes()]
        ),
        seed
    );
    let words: Vec<u32> = field(&f, "first mask words")
        .split_whitespace()
        .map(|w| u32::from_str_radix(w, 16).expect("hex word"))
        .collect();
    assert_eq!(words.len(), 8);
    assert_eq!(mask::expand(&seed, 8), words);
    assert_ne!(
        a.pairwise_seed(&b.public(), b"mask|local|5")
            .expect("agree"),
        seed,
        "another round, another seed"
    );
}

#[test]
fn vector_g_share_key_derives_and_the_ciphertext_opens() {
    let g = vector_fields("#### G. A share encrypted to its holder");
    let h = vector_fields("#### H. Shamir shares");
    let (sk1, sk2) = (
        hex32(&g, "client-1 cipher secret"),
        hex32(&g, "client-2 cipher secret"),
    );
    let (owner, holder) = (KeyPair::from_secret(sk1), KeyPair::from_secret(sk2));
    assert_eq!(owner.public(), hex32(&g, "client-1 cipher public"));
    assert_eq!(holder.public(), hex32(&g, "client-2 cipher public"));
    let ctx = format!("share|{}|client-1|client-2", secagg::context(RUN, ROUND));
    assert_eq!(ctx, field(&g, "context"));
    assert_eq!(
        MontgomeryPoint(holder.public()).mul_clamped(sk1).to_bytes(),
        hex32(&g, "shared secret")
    );
    let key = owner
        .pairwise_seed(&holder.public(), ctx.as_bytes())
        .expect("agree");
    assert_eq!(key, hex32(&g, "key"));
    assert_eq!(
        holder
            .pairwise_seed(&owner.public(), ctx.as_bytes())
            .expect("agree"),
        key,
        "the holder derives the owner's key"
    );

    // The plaintext: vector H's shares at x = 2, self-mask first.
    let plain = hex_field(&g, "plaintext");
    assert_eq!(plain.len(), 2 * shamir::SHARE_BYTES);
    let (s, k) = plain.split_at(shamir::SHARE_BYTES);
    assert_eq!(s, &hex_field(&h, "self-mask share 2")[..]);
    assert_eq!(k, &hex_field(&h, "mask key share 2")[..]);
    for part in [s, k] {
        let share = Share::from_bytes(part).expect("a share");
        assert_eq!(share.x, 2, "client-2 is the second holder");
        assert_eq!(&share.to_bytes()[..], part);
    }

    // AES-256-GCM, zero nonce, the context as associated data (what `secagg::bundle` does; its
    // functions are private to the module, and a ClientSession draws its own keys).
    let ct = hex_field(&g, "ciphertext");
    assert_eq!(ct.len(), secagg::bundle::CIPHERTEXT_BYTES);
    assert_eq!(ct.len() * 2, 296, "the bundle's ct is 296 hex digits");
    let aes = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &key).expect("AES-256 key"));
    let mut buf = ct.clone();
    let opened = aes
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(ctx.as_bytes()),
            &mut buf,
        )
        .expect("the share opens with the derived key");
    assert_eq!(opened, &plain[..]);
    let mut sealed = plain.clone();
    aes.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::from(ctx.as_bytes()),
        &mut sealed,
    )
    .expect("seal");
    assert_eq!(sealed, ct, "the same ciphertext and tag");
    // Bound to the owner and holder: the context of the reverse direction does not open it.
    let mut buf = ct.clone();
    assert!(aes
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(b"share|local|4|client-2|client-1".as_slice()),
            &mut buf,
        )
        .is_err());
}

#[test]
fn vector_h_shamir_shares_recover_and_reencode() {
    let h = vector_fields("#### H. Shamir shares");
    let f = vector_fields("#### F. A pairwise mask seed");
    let t: usize = num(&h, "threshold");
    assert_eq!(t, 3);
    let mut all = BTreeMap::new();
    for (name, secret_field) in [("self-mask", "self-mask seed"), ("mask key", "mask key")] {
        let secret = hex32(&h, secret_field);
        let shares: Vec<Share> = (1..=5u16)
            .map(|x| {
                let s = share_field(&h, &format!("{name} share {x}"));
                assert_eq!(s.x, x);
                s
            })
            .collect();
        // The shares are f(x) = s + a1·x + a2·x², limb by limb, in GF(2^61 − 1).
        let limbs = |label: &str| -> Vec<Fp> {
            hex_field(&h, label)
                .chunks_exact(8)
                .map(|c| {
                    Fp::canonical(u64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .expect("a coefficient below p")
                })
                .collect()
        };
        let (a1, a2) = (limbs(&format!("{name} a1")), limbs(&format!("{name} a2")));
        for s in &shares {
            let bytes = s.to_bytes();
            let x = Fp::new(u64::from(s.x));
            for l in 0..8 {
                let limb = u32::from_le_bytes(secret[4 * l..4 * l + 4].try_into().expect("4"));
                let y = Fp::new(u64::from(limb)) + a1[l] * x + a2[l] * x * x;
                let got = u64::from_le_bytes(bytes[2 + 8 * l..10 + 8 * l].try_into().expect("8"));
                assert_eq!(got, y.value(), "{name} share {}, limb {l}", s.x);
            }
        }
        // Any three recover the secret, in any order.
        assert_eq!(
            shamir::recover(&shares[..3], t),
            Ok(secret),
            "{name} x = 1, 2, 3"
        );
        let other = [shares[4].clone(), shares[1].clone(), shares[3].clone()];
        assert_eq!(shamir::recover(&other, t), Ok(secret), "{name} x = 5, 2, 4");
        for i in 0..5 {
            for j in i + 1..5 {
                for k in j + 1..5 {
                    let subset = [shares[i].clone(), shares[j].clone(), shares[k].clone()];
                    assert_eq!(shamir::recover(&subset, t), Ok(secret));
                }
            }
        }
        assert_eq!(
            shamir::recover(&shares[..2], t),
            Err(ShamirError::TooFew {
                got: 2,
                threshold: 3
            })
        );
        all.insert(name, shares);
    }
    let mixed = [
        all["self-mask"][0].clone(),
        all["self-mask"][1].clone(),
        all["mask key"][2].clone(),
    ];
    assert_eq!(
        shamir::recover(&mixed, t),
        Err(ShamirError::Inconsistent),
        "shares of two secrets do not mix"
    );
    // The mask key is vector F's client-1 mask secret: what the server recovers of a dropped
    // client gives its advertised public key back.
    let key = shamir::recover(&all["mask key"][2..], t).expect("recover");
    assert_eq!(key, hex32(&f, "client-1 mask secret"));
    assert_eq!(
        KeyPair::from_secret(key).public(),
        hex32(&f, "client-1 mask public")
    );
}

#[test]
fn vector_i_quantizes_as_stated() {
    let v = vector_fields("#### I. Quantization");
    let clip: f32 = num(&v, "clip");
    let clients: u64 = num(&v, "clients");
    let bits: u32 = num(&v, "bits");
    assert_eq!(Quantizer::max_bits(clients), bits, "b = 32 − ⌈log2 N⌉");
    let q = Quantizer::with_bits(clip, bits, clients).expect("quantizer");
    assert_eq!(Quantizer::new(clip, clients).expect("quantizer"), q);
    let inputs: Vec<f32> = list(&v, "inputs");
    let want: Vec<u32> = list(&v, "q");
    assert_eq!(inputs.len(), want.len());
    for (x, w) in inputs.iter().zip(&want) {
        assert_eq!(q.quantize(*x), *w, "q of {x}");
    }
    let mut singles = 0;
    for (label, value) in &v {
        if let Some(x) = label.strip_prefix("q of ") {
            let x: f32 = x.parse().expect("an f32");
            assert_eq!(
                q.quantize(x).to_string(),
                *value,
                "q of {x} (NaN counts as 0; f64 arithmetic)"
            );
            singles += 1;
        }
    }
    assert_eq!(singles, 2);
    let sum = want
        .iter()
        .try_fold(0u32, |s, q| s.checked_add(*q))
        .expect("N·L < 2^32: no overflow");
    assert_eq!(sum, num::<u32>(&v, "sum"));
    let n = inputs.len() as u64;
    let deq = q.dequantize_sum(sum, n);
    let want_deq: f64 = num(&v, "dequantized sum");
    assert!((deq - want_deq).abs() <= 1e-12, "{deq} != {want_deq}");
    let clipped: f64 = inputs.iter().map(|x| f64::from(x.clamp(-clip, clip))).sum();
    assert!((clipped - num::<f64>(&v, "clipped sum")).abs() <= 1e-12);
    let bound = q.sum_error_bound(n);
    assert!((bound - num::<f64>(&v, "error bound")).abs() <= 1e-20);
    assert!((deq - clipped).abs() <= bound);
}

#[test]
fn vector_j_masks_cancel_and_the_server_unmasks() {
    let j = vector_fields("#### J. Masked inputs of three clients");
    let f = vector_fields("#### F. A pairwise mask seed");
    let g = vector_fields("#### G. A share encrypted to its holder");
    let clip: f64 = num(&j, "clip");
    let bits: u32 = num(&j, "bits");
    let t: usize = num(&j, "threshold");
    let params = Params::for_clients(SA_CLIENTS.len());
    assert_eq!(
        (params.degree, params.threshold),
        (2, t),
        "k = 2, t = ⌊3/2⌋ + 1"
    );
    let quant = Quantizer::new(clip as f32, SA_CLIENTS.len() as u64).expect("quantizer");
    assert_eq!(quant.bits(), bits);
    let at = |c: &str, what: &str| format!("{c} {what}");
    let weights: BTreeMap<&str, u64> = SA_CLIENTS
        .iter()
        .map(|c| (*c, num(&j, &at(c, "weight"))))
        .collect();
    let total: u64 = weights.values().sum();
    let keys: BTreeMap<&str, KeyPair> = SA_CLIENTS
        .iter()
        .map(|c| (*c, KeyPair::from_secret(hex32(&j, &at(c, "mask secret")))))
        .collect();
    assert_eq!(keys["client-1"].public(), hex32(&f, "client-1 mask public"));
    assert_eq!(keys["client-2"].public(), hex32(&f, "client-2 mask public"));
    for c in ["client-1", "client-2"] {
        assert_eq!(
            hex32(&j, &at(c, "cipher public")),
            hex32(&g, &at(c, "cipher public"))
        );
    }
    let ctx = mask_ctx();
    assert_eq!(
        keys["client-1"]
            .pairwise_seed(&keys["client-2"].public(), ctx.as_bytes())
            .expect("agree"),
        hex32(&f, "seed")
    );

    // Each client's masked input, from its update.
    let mut qs = BTreeMap::new();
    let mut masked = BTreeMap::new();
    let mut scaled_all = BTreeMap::new();
    for c in SA_CLIENTS {
        let update: Vec<f32> = list(&j, &at(c, "update"));
        let scaled: Vec<f32> = list(&j, &at(c, "scaled"));
        let s = weights[c] as f64 / total as f64;
        let computed: Vec<f32> = update.iter().map(|u| (f64::from(*u) * s) as f32).collect();
        assert_eq!(computed, scaled, "{c}: scaled by weight / weight_total");
        let q: Vec<u32> = scaled.iter().map(|v| quant.quantize(*v)).collect();
        assert_eq!(q, list::<u32>(&j, &at(c, "q")), "{c}");
        let mut y = q.clone();
        mask::apply(&hex32(&j, &at(c, "self-mask seed")), Sign::Add, &mut y);
        for peer in SA_CLIENTS.iter().filter(|p| **p != c) {
            let seed = keys[c]
                .pairwise_seed(&keys[peer].public(), ctx.as_bytes())
                .expect("agree");
            let sign = if c < *peer { Sign::Add } else { Sign::Sub };
            mask::apply(&seed, sign, &mut y);
        }
        assert_eq!(y, list::<u32>(&j, &at(c, "masked")), "{c}: masked input");
        assert_eq!(
            secagg::decode_masked(&secagg::encode_masked(&y)).expect("blob"),
            y
        );
        qs.insert(c, q);
        masked.insert(c, y);
        scaled_all.insert(c, scaled);
    }
    // The pairwise masks cancel: the sum less the self-masks is the sum of the q.
    let mut sum = vec![0u32; 4];
    for c in SA_CLIENTS {
        for (s, y) in sum.iter_mut().zip(&masked[c]) {
            *s = s.wrapping_add(*y);
        }
        mask::apply(&hex32(&j, &at(c, "self-mask seed")), Sign::Sub, &mut sum);
    }
    let q_sum: Vec<u32> = (0..4)
        .map(|k| SA_CLIENTS.iter().map(|c| qs[c][k]).sum())
        .collect();
    assert_eq!(sum, q_sum);
    // The given shares recover the secrets they are of.
    for c in SA_CLIENTS {
        let shares = [1, 2].map(|x| share_field(&j, &format!("{c} self-mask share {x}")));
        assert_eq!(
            shamir::recover(&shares, t),
            Ok(hex32(&j, &at(c, "self-mask seed")))
        );
    }
    let shares = [1, 2].map(|x| share_field(&j, &format!("client-3 mask key share {x}")));
    assert_eq!(
        shamir::recover(&shares, t),
        Ok(hex32(&j, "client-3 mask secret"))
    );

    // The server unmasks the page's masked inputs, with and without client-3's.
    for (survivors, mean_field) in [
        (&SA_CLIENTS[..], "mean"),
        (&SA_CLIENTS[..2], "mean without client-3"),
    ] {
        let selected: Vec<String> = SA_CLIENTS.iter().map(|c| c.to_string()).collect();
        let mut server =
            ServerSession::new(RUN, ROUND, &selected, params, clip, 7, 4, 30_000).expect("session");
        assert_eq!(server.setup().bits, bits);
        assert_eq!(server.setup().threshold as usize, t);
        for c in SA_CLIENTS {
            let advert = SaKeys {
                cipher_pk: field(&j, &at(c, "cipher public")).to_string(),
                mask_pk: hex::encode(keys[c].public()),
                num_samples: weights[c],
            };
            server.add_keys(c, &advert, weights[c]).expect("keys");
        }
        let rosters = server.rosters().expect("rosters");
        for c in SA_CLIENTS {
            let r = &rosters[c];
            assert_eq!((r.weight, r.weight_total), (weights[c], total));
            let ns: Vec<&str> = r.neighbours.iter().map(|n| n.id.as_str()).collect();
            let others: Vec<&str> = SA_CLIENTS.iter().copied().filter(|o| *o != c).collect();
            assert_eq!(ns, others, "the complete graph");
        }
        for c in SA_CLIENTS {
            let bundle = BlobRef {
                key: BlobKeys::new(fedmq::federation::KEY_PREFIX, RUN).shares(ROUND, c),
                len: 1,
                sha256: "0".repeat(64),
                wrapped_key: None,
            };
            server.add_shares(c, bundle).expect("shares");
            // The server checks a bundle's shape (it cannot open the shares): one entry of the
            // right length per neighbour. Stand-in ciphertexts do here; the shares this vector
            // reveals are given below.
            let entries: Vec<serde_json::Value> = SA_CLIENTS
                .iter()
                .filter(|o| **o != c)
                .map(|o| {
                    serde_json::json!({
                        "to": o,
                        "ct": "00".repeat(fedmq::secagg::bundle::CIPHERTEXT_BYTES),
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "v": 1, "context": format!("{RUN}|{ROUND}"), "from": c, "shares": entries,
            });
            server
                .add_bundle(c, doc.to_string().as_bytes())
                .expect("a well-formed bundle");
        }
        server.collects().expect("collects");
        for c in survivors {
            server.add_masked(c, &masked[c]).expect("masked");
        }
        let dropped: Vec<String> = SA_CLIENTS[survivors.len()..]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let requests = server.unmask_requests().expect("unmask requests");
        for c in survivors {
            let others: Vec<String> = survivors
                .iter()
                .filter(|o| *o != c)
                .map(|o| o.to_string())
                .collect();
            assert_eq!(requests[*c].survivors, others);
            assert_eq!(requests[*c].dropped, dropped);
        }
        // client-1 and client-2 (x = 1 and 2) reveal what they were asked for.
        for (x, holder) in [(1, "client-1"), (2, "client-2")] {
            let reveal = SaReveal {
                self_masks: survivors
                    .iter()
                    .map(|owner| RevealedShare {
                        of: owner.to_string(),
                        share: field(&j, &format!("{owner} self-mask share {x}")).to_string(),
                    })
                    .collect(),
                mask_keys: dropped
                    .iter()
                    .map(|d| RevealedShare {
                        of: d.clone(),
                        share: field(&j, &format!("{d} mask key share {x}")).to_string(),
                    })
                    .collect(),
                mask_share: None,
            };
            server.add_reveal(holder, &reveal).expect("reveal");
        }
        assert!(
            server.ready(),
            "{mean_field}: t shares of every needed secret"
        );
        let out = server
            .finish()
            .unwrap_or_else(|e| panic!("{mean_field}: {e}"));
        assert_eq!(out.survivors, survivors.to_vec());
        let want: Vec<f32> = list(&j, mean_field);
        assert_eq!(out.mean_update.len(), want.len());
        let share = survivors.iter().map(|c| weights[c]).sum::<u64>() as f64 / total as f64;
        let bound = quant.sum_error_bound(survivors.len() as u64) / share;
        assert!((out.error_bound - bound).abs() <= 1e-18);
        for (k, (got, w)) in out.mean_update.iter().zip(&want).enumerate() {
            assert_f32_close(*got, *w, &format!("{mean_field}, coordinate {k}"));
            // The weighted mean of the clipped scaled updates, within the error bound.
            let exact = survivors
                .iter()
                .map(|c| f64::from(scaled_all[c][k]).clamp(-clip, clip))
                .sum::<f64>()
                / share;
            assert!(
                (f64::from(*got) - exact).abs() <= bound + 1e-7,
                "{mean_field}, coordinate {k}: {got} vs {exact}"
            );
        }
    }
}

/// Vector K: LightSecAgg's mask (AES-256-CTR words below q), its coded shares for the stated
/// noise, and the aggregate mask decoded from three summed shares.
#[test]
fn vector_k_lightsecagg_codes_and_decodes_the_aggregate_mask() {
    use fedmq::secagg::light::{self, LightParams};
    let k = vector_fields("#### K. LightSecAgg coded mask shares");
    let num = |name: &str| -> u64 { field(&k, name).parse().expect(name) };
    let list = |name: &str| -> Vec<u32> {
        field(&k, name)
            .split(", ")
            .map(|v| v.parse().expect(name))
            .collect()
    };
    assert_eq!(num("modulus"), light::Q);
    let n = num("clients") as usize;
    let params = LightParams {
        active: num("active") as usize,
        privacy: num("privacy") as usize,
    };
    let len = num("length") as usize;
    assert_eq!(params.share_len(len), num("share length") as usize);
    let owners: Vec<String> = (1..=n).map(|i| format!("client-{i}")).collect();
    let mut shares = Vec::new();
    for c in &owners {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(field(&k, &format!("{c} seed")), &mut seed).unwrap();
        let mask = light::mask_of(&seed, len);
        assert_eq!(mask, list(&format!("{c} mask")), "{c}'s mask");
        let noise = vec![list(&format!("{c} noise"))];
        let coded = light::encode_with_noise(&mask, &noise, n, params).unwrap();
        for (x, share) in coded.iter().enumerate() {
            assert_eq!(
                *share,
                list(&format!("{c} share {}", x + 1)),
                "{c} x {}",
                x + 1
            );
        }
        shares.push(coded);
    }
    let mut sums = Vec::new();
    for x in [1u32, 2, 4] {
        let mut sum = vec![0u32; params.share_len(len)];
        for coded in &shares {
            for (s, v) in sum.iter_mut().zip(&coded[x as usize - 1]) {
                *s = light::add(*s, *v);
            }
        }
        assert_eq!(sum, list(&format!("summed share {x}")));
        sums.push((x, sum));
    }
    let views: Vec<(u32, &[u32])> = sums.iter().map(|(x, s)| (*x, s.as_slice())).collect();
    let aggregate = light::decode(&views, n, params, len).unwrap();
    assert_eq!(aggregate, list("aggregate mask"));
}
