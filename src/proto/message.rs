//! Control messages: the [`Envelope`] every message shares and the typed [`Body`] it carries.

use super::secagg::{
    SaCollect, SaKeys, SaMasked, SaReveal, SaRoster, SaShares, SaUnmask, SecAggSetup,
};
use super::{valid_id, PROTOCOL_VERSION};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// One control message. JSON on the wire; fields in `docs/PROTOCOL.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version; must equal [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Run id: which federation this message belongs to.
    pub run: String,
    /// Round the message refers to (0 for run-level messages such as presence).
    pub round: u64,
    /// Message id, unique per sender (16 random hex digits from [`Envelope::new`]); receivers use
    /// it to drop duplicates delivered twice by QoS 1.
    pub id: String,
    /// Sender: `server` or a client id.
    pub from: String,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// What the message says.
    pub body: Body,
}

/// The typed content of a message, tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    /// Presence of a participant (retained on its status topic).
    Status(Status),
    /// Server → client: train on a global model.
    Train(Train),
    /// Client → server: a trained update is in the store.
    Update(Update),
    /// Client → server: the client cannot complete the round.
    Failure(Failure),
    /// Server → client: the run is over; disconnect.
    Finish(Finish),
    /// Secure aggregation, client → server: this round's public keys.
    SaKeys(SaKeys),
    /// Secure aggregation, server → client: its neighbours' keys and its weight.
    SaRoster(SaRoster),
    /// Secure aggregation, client → server: its encrypted share bundle is stored.
    SaShares(SaShares),
    /// Secure aggregation, server → client: the neighbours that shared, and its share inbox.
    SaCollect(SaCollect),
    /// Secure aggregation, client → server: its masked input is stored.
    SaMasked(SaMasked),
    /// Secure aggregation, server → client: which neighbours survived and which dropped.
    SaUnmask(SaUnmask),
    /// Secure aggregation, client → server: the shares the unmask request asked for.
    SaReveal(SaReveal),
}

impl Body {
    /// The wire name of the message type.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Status(_) => "status",
            Body::Train(_) => "train",
            Body::Update(_) => "update",
            Body::Failure(_) => "failure",
            Body::Finish(_) => "finish",
            Body::SaKeys(_) => "sa_keys",
            Body::SaRoster(_) => "sa_roster",
            Body::SaShares(_) => "sa_shares",
            Body::SaCollect(_) => "sa_collect",
            Body::SaMasked(_) => "sa_masked",
            Body::SaUnmask(_) => "sa_unmask",
            Body::SaReveal(_) => "sa_reveal",
        }
    }
}

/// A reference to a blob in the object store. The receiver checks length and digest before use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Object key in the run's bucket.
    pub key: String,
    /// Exact length in bytes.
    pub len: u64,
    /// SHA-256 of the bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// The blob's content key wrapped to the receiver of this message (160 hex digits), when the
    /// blob is sealed (`seal` module). Absent: a plaintext blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_key: Option<String>,
}

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Connected and ready.
    Online,
    /// Disconnected (published by the participant on clean exit, or by the broker as last will).
    Offline,
}

/// Whether a participant is the server or a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Coordinates the run.
    Server,
    /// Trains on its own data.
    Client,
}

/// Presence message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Online or offline.
    pub state: Presence,
    /// Server or client.
    pub role: Role,
    /// What the participant can do (clients, when online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// The server, when online: clients that see this status with an id they have not seen
    /// before (a server that restarted or reconnected) announce themselves again, each after a
    /// random delay in `[0, announce_window_ms]`, and re-announce their latest update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_window_ms: Option<u64>,
}

/// What a client brings to the federation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Training device, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// CPU cores available for training.
    pub cores: u32,
    /// GPU model, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// Number of local training samples.
    pub samples: u64,
    /// fedmq version (or the implementation's own version string).
    pub version: String,
}

/// Local training hyper-parameters sent with a train command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Model name (`lr`, `mlp`, `cnn`); the client checks it matches its own.
    pub model: String,
    /// Local epochs.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// `sgd` or `adam`.
    pub optimizer: String,
    /// Learning rate.
    pub learning_rate: f64,
    /// SGD momentum.
    #[serde(default)]
    pub momentum: f64,
    /// L2 weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Shuffling seed for this round.
    pub seed: u64,
}

/// What a strategy asks of a client's local training beyond [`TrainConfig`] (a proximal term,
/// ...): named numbers under a strategy name and a schema version. A client that does not know
/// the version or a parameter reports a failure instead of training differently than asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyInstruction {
    /// The strategy (`FedProx`), for logs and errors.
    pub name: String,
    /// Version of the parameter schema; this build knows [`STRATEGY_INSTRUCTION_VERSION`].
    pub version: u32,
    /// Named parameters, e.g. `proximal_mu`; the meaning of each is in `docs/PROTOCOL.md`.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, f64>,
}

/// The [`StrategyInstruction`] schema version this build writes and reads.
pub const STRATEGY_INSTRUCTION_VERSION: u32 = 1;

/// Prefix of the strategy's tensors inside model blobs: a global model blob may carry the
/// strategy's round tensors (SCAFFOLD's server control variate as `strategy/control/<param>`),
/// an update blob what the client returns besides its model (`strategy/delta_control/<param>`).
/// No model parameter name starts with it.
pub const STRATEGY_TENSOR_PREFIX: &str = "strategy/";

/// Server → client: train on the global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Train {
    /// The global model to start from.
    pub global: BlobRef,
    /// How to train.
    pub config: TrainConfig,
    /// What the strategy adds to local training; absent for plain local training (FedAvg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StrategyInstruction>,
    /// Unix time (ms) by which the update must be reported; later reports are discarded.
    pub deadline_ms: u64,
    /// Present when the round is securely aggregated: the client masks its update and takes
    /// part in the stages of `docs/PROTOCOL.md`, "Secure aggregation".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg: Option<SecAggSetup>,
}

/// Metrics of one local training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainMetrics {
    /// Mean training loss over the last local epoch.
    pub train_loss: f64,
    /// Wall-clock seconds spent training.
    pub train_seconds: f64,
    /// The trained model measured on the client's own held-out samples: sent by clients of a
    /// model with local parameters (which only the client can evaluate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<ClientEval>,
}

impl TrainMetrics {
    /// Checks that every number is finite and the evaluation's sums are consistent.
    ///
    /// # Errors
    /// What is wrong, for the rejection reason.
    pub fn validate(&self) -> Result<(), String> {
        if !self.train_loss.is_finite() || !self.train_seconds.is_finite() {
            return Err("metrics must be finite numbers".into());
        }
        if let Some(e) = &self.eval {
            e.validate()?;
        }
        Ok(())
    }
}

/// Sums over a client's held-out samples, which the server adds up over a round's clients:
/// loss and accuracy (classification) or squared and absolute errors (a real target).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClientEval {
    /// Held-out samples evaluated (at most 2³² per client).
    pub samples: u64,
    /// Sum of the per-sample loss.
    pub loss_sum: f64,
    /// Correct predictions (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<u64>,
    /// Sum of squared errors (a real target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sq_err_sum: Option<f64>,
    /// Sum of absolute errors (a real target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abs_err_sum: Option<f64>,
}

impl ClientEval {
    /// Most held-out samples one client may report.
    pub const MAX_SAMPLES: u64 = 1 << 32;

    fn validate(&self) -> Result<(), String> {
        if self.samples == 0 || self.samples > Self::MAX_SAMPLES {
            return Err(format!(
                "eval.samples must be between 1 and {}, got {}",
                Self::MAX_SAMPLES,
                self.samples
            ));
        }
        let sums = [Some(self.loss_sum), self.sq_err_sum, self.abs_err_sum];
        if sums.iter().flatten().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("eval sums must be finite and ≥ 0".into());
        }
        if self.correct.is_some_and(|c| c > self.samples) {
            return Err("eval.correct exceeds eval.samples".into());
        }
        Ok(())
    }
}

/// Client → server: an update is ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The trained model (full parameters, safetensors).
    pub update: BlobRef,
    /// Samples the client trained on (the FedAvg weight).
    pub num_samples: u64,
    /// Training metrics.
    pub metrics: TrainMetrics,
    /// What the strategy instruction asked the client to report about its local training
    /// (FedNova's `local_steps` and `normalizer`); empty, and left out, otherwise.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub report: std::collections::BTreeMap<String, f64>,
}

/// Client → server: this round failed on the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Human-readable reason.
    pub reason: String,
}

/// Server → clients: the run is over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finish {
    /// Why (`completed`, `aborted: ...`).
    pub reason: String,
    /// The final model, when the run completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_model: Option<BlobRef>,
}

impl Envelope {
    /// A new message from `from` in run `run`, with a fresh random id and the current time.
    pub fn new(run: &str, round: u64, from: &str, body: Body) -> Self {
        let id: u64 = rand::rng().random();
        Self {
            v: PROTOCOL_VERSION,
            run: run.to_string(),
            round,
            id: format!("{id:016x}"),
            from: from.to_string(),
            ts_ms: now_ms(),
            body,
        }
    }

    /// Checks the fields that JSON typing cannot: ids, digests, lengths, finite numbers.
    ///
    /// # Errors
    /// A human-readable reason naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.v != PROTOCOL_VERSION {
            return Err(format!("unsupported protocol version {}", self.v));
        }
        for (name, v) in [("run", &self.run), ("id", &self.id), ("from", &self.from)] {
            if !valid_id(v) {
                return Err(format!(
                    "field `{name}` must be 1-64 characters of [A-Za-z0-9_-], got {:?}",
                    truncate(v)
                ));
            }
        }
        match &self.body {
            Body::Status(s) => {
                if let Some(c) = &s.capabilities {
                    check_text("capabilities.device", &c.device)?;
                    check_text("capabilities.version", &c.version)?;
                    if let Some(g) = &c.gpu {
                        check_text("capabilities.gpu", g)?;
                    }
                }
            }
            Body::Train(t) => {
                t.global.validate("global")?;
                let c = &t.config;
                check_text("config.model", &c.model)?;
                check_text("config.optimizer", &c.optimizer)?;
                if c.epochs == 0 || c.batch_size == 0 {
                    return Err("config.epochs and config.batch_size must be ≥ 1".into());
                }
                if let Some(sa) = &t.secagg {
                    sa.validate()?;
                }
                for (n, x) in [
                    ("config.learning_rate", c.learning_rate),
                    ("config.momentum", c.momentum),
                    ("config.weight_decay", c.weight_decay),
                ] {
                    if !x.is_finite() || x < 0.0 {
                        return Err(format!("{n} must be a finite number ≥ 0"));
                    }
                }
            }
            Body::Update(u) => {
                u.update.validate("update")?;
                if u.num_samples == 0 {
                    return Err("num_samples must be ≥ 1".into());
                }
                u.metrics.validate()?;
            }
            Body::Failure(f) => check_text("reason", &f.reason)?,
            Body::Finish(f) => {
                check_text("reason", &f.reason)?;
                if let Some(b) = &f.final_model {
                    b.validate("final_model")?;
                }
            }
            Body::SaKeys(k) => k.validate()?,
            Body::SaRoster(r) => r.validate()?,
            Body::SaShares(s) => s.bundle.validate("bundle")?,
            Body::SaCollect(c) => c.validate()?,
            Body::SaMasked(m) => m.validate()?,
            Body::SaUnmask(u) => u.validate()?,
            Body::SaReveal(r) => r.validate()?,
        }
        Ok(())
    }
}

impl BlobRef {
    /// Checks the key shape and the digest format.
    ///
    /// # Errors
    /// A reason naming `field`.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        if self.key.is_empty() || self.key.len() > 1024 {
            return Err(format!("{field}.key must be 1-1024 bytes"));
        }
        if self.key.starts_with('/')
            || self
                .key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            || self.key.chars().any(|c| c.is_control())
        {
            return Err(format!(
                "{field}.key {:?} is not a clean object key",
                truncate(&self.key)
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(format!("{field}.sha256 must be 64 lowercase hex digits"));
        }
        if let Some(w) = &self.wrapped_key {
            if w.len() != super::WRAPPED_KEY_HEX_LEN
                || !w.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(format!(
                    "{field}.wrapped_key must be {} lowercase hex digits",
                    super::WRAPPED_KEY_HEX_LEN
                ));
            }
        }
        Ok(())
    }
}

/// Longest free text (reasons, names) a message may carry, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;

/// `s` made fit for a free-text field: control characters (newlines of a multi-line error)
/// become spaces, and text beyond [`MAX_TEXT_BYTES`] is cut at a character boundary and marked
/// with `…`.
pub fn clip_text(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= MAX_TEXT_BYTES {
        return clean;
    }
    let mut end = MAX_TEXT_BYTES - '…'.len_utf8();
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
}

/// Free text in messages is short and printable.
fn check_text(name: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_BYTES || s.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{name} must be at most {MAX_TEXT_BYTES} bytes of printable characters"
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_text_is_always_a_valid_reason() {
        let long = format!("first line\nsecond\t{}", "é".repeat(2000));
        let c = clip_text(&long);
        assert!(c.len() <= MAX_TEXT_BYTES, "{}", c.len());
        assert!(c.starts_with("first line second "), "{c}");
        assert!(c.ends_with('…'));
        check_text("reason", &c).unwrap();
        assert_eq!(clip_text("short"), "short");
    }

    #[test]
    fn a_clients_own_evaluation_is_checked() {
        let metrics = |eval: ClientEval| TrainMetrics {
            train_loss: 0.5,
            train_seconds: 1.0,
            eval: Some(eval),
        };
        let rated = ClientEval {
            samples: 20,
            loss_sum: 18.0,
            correct: None,
            sq_err_sum: Some(18.0),
            abs_err_sum: Some(15.0),
        };
        metrics(rated.clone()).validate().unwrap();
        // The wire form: absent fields are left out.
        let json = serde_json::to_string(&rated).unwrap();
        assert_eq!(
            json,
            r#"{"samples":20,"loss_sum":18.0,"sq_err_sum":18.0,"abs_err_sum":15.0}"#
        );
        for (bad, why) in [
            (
                ClientEval {
                    samples: 0,
                    ..rated.clone()
                },
                "eval.samples",
            ),
            (
                ClientEval {
                    samples: ClientEval::MAX_SAMPLES + 1,
                    ..rated.clone()
                },
                "eval.samples",
            ),
            (
                ClientEval {
                    loss_sum: -1.0,
                    ..rated.clone()
                },
                "finite",
            ),
            (
                ClientEval {
                    sq_err_sum: Some(f64::INFINITY),
                    ..rated.clone()
                },
                "finite",
            ),
            (
                ClientEval {
                    correct: Some(21),
                    ..rated.clone()
                },
                "exceeds",
            ),
        ] {
            let err = metrics(bad).validate().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        // A message without the field (an older client) still reads.
        let old: TrainMetrics =
            serde_json::from_str(r#"{"train_loss":0.2,"train_seconds":3.0}"#).unwrap();
        assert_eq!(old.eval, None);
    }
}
