//! Checkpoints: what the server stores to resume a run, written as rounds close and read back by
//! `fedmq server --resume`.
//!
//! After round `r` closes, its model is the global model of round `r + 1` (or the final model).
//! Once that blob is stored, the driver's `Checkpointer` writes `checkpoint/r<r>`: a small JSON
//! document naming the model blob (key, length, SHA-256), the round, the strategy and its state.
//! The model is stored once, not twice per round; the checkpoint's blob reference is verified on
//! resume like any other.
//!
//! Writes run in the background, one at a time and in round order; the newest two checkpoints
//! are kept. In a sealed federation the document and the strategy's tensors are sealed with the
//! server's own key and the model reference carries the model's content key wrapped to the
//! server ([`SealedStore`]).

use super::driver::{ServerError, SERVER_ID};
use crate::proto::{self, BlobKeys, BlobRef};
use crate::store::{SealedError, SealedStore, Written};
use crate::strategy::StrategyState;
use crate::tensor::ParamSet;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// A checkpoint: everything needed to resume after `round`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version (1).
    pub v: u32,
    /// Run id.
    pub run: String,
    /// Last completed round.
    pub round: u64,
    /// Strategy name.
    pub strategy: String,
    /// Strategy state ([`Strategy::state`](crate::strategy::Strategy::state)), its JSON part.
    pub state: serde_json::Value,
    /// Its tensors (server-optimizer moments), a safetensors blob at
    /// `BlobKeys::checkpoint_state` (sealed with the server's own key when blobs are sealed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_blob: Option<BlobRef>,
    /// The model after `round`. In a sealed federation its `wrapped_key` is wrapped to the
    /// server itself, and the whole document is sealed with the server's own key.
    pub model: BlobRef,
    /// Milliseconds since the Unix epoch when written.
    pub ts_ms: u64,
}

/// Finds the newest checkpoint of the run in the store, if any.
///
/// # Errors
/// [`ServerError::Store`] when listing or reading fails, [`ServerError::Checkpoint`] when the
/// document is unreadable.
pub async fn latest_checkpoint(
    store: &SealedStore,
    keys: &BlobKeys,
) -> Result<Option<Checkpoint>, ServerError> {
    let prefix = keys.checkpoint_prefix();
    let mut objects = store.inner().list(&prefix).await?;
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let Some(last) = objects.last() else {
        return Ok(None);
    };
    let bytes = store.get_unverified(&last.key).await?;
    let bytes = store.open_own(&last.key, bytes).map_err(|e| {
        ServerError::Checkpoint(match e {
            SealedError::Unsealed { key } => format!(
                "{key} is not sealed, but this server seals its blobs: refusing a checkpoint \
                 anyone with store credentials could have written"
            ),
            SealedError::NoKeys { key } => format!(
                "{key} is sealed: resume with the server's signing_key and trusted_keys set"
            ),
            e => e.to_string(),
        })
    })?;
    let cp: Checkpoint = serde_json::from_slice(&bytes)
        .map_err(|e| ServerError::Checkpoint(format!("{}: {e}", last.key)))?;
    Ok(Some(cp))
}

/// Loads the model a checkpoint names (verified against its SHA-256).
///
/// # Errors
/// As [`latest_checkpoint`], plus a decoding error naming the key.
pub async fn load_checkpoint_model(
    store: &SealedStore,
    cp: &Checkpoint,
) -> Result<ParamSet, ServerError> {
    let bytes = store.get(&cp.model).await?;
    let bytes = store
        .open(&cp.model, bytes)
        .map_err(|e| ServerError::Checkpoint(open_failed(e)))?;
    let mut model = ParamSet::from_safetensors_bytes(&bytes)
        .map_err(|e| ServerError::Checkpoint(format!("{}: {e}", cp.model.key)))?;
    // The round's strategy tensors travel in the same blob; the strategy restores its own
    // state from the checkpoint's state blob.
    model.split_prefix(proto::STRATEGY_TENSOR_PREFIX);
    Ok(model)
}

/// Loads a checkpoint's strategy tensors (verified against their SHA-256, opened with the
/// server's own key when blobs are sealed).
///
/// # Errors
/// The blob is missing, altered or undecodable.
pub(super) async fn load_checkpoint_state(
    store: &SealedStore,
    r: &BlobRef,
) -> Result<ParamSet, ServerError> {
    let bytes = store.get(r).await?;
    let bytes = store
        .open_own(&r.key, bytes)
        .map_err(|e| ServerError::Checkpoint(format!("{}: {e}", r.key)))?;
    ParamSet::from_safetensors_bytes(&bytes)
        .map_err(|e| ServerError::Checkpoint(format!("{}: {e}", r.key)))
}

/// Why a fetched blob (an update, a checkpoint's model) does not open, in the server's words.
pub(super) fn open_failed(e: SealedError) -> String {
    match e {
        SealedError::NoKeys { key } => format!(
            "{key}: the blob is sealed, but this server has no encryption keys (set \
             fedmq_args.signing_key and trusted_keys)"
        ),
        e => e.to_string(),
    }
}

/// Writes each closed round's checkpoint once the model it produced is stored.
pub(super) struct Checkpointer {
    store: SealedStore,
    keys: BlobKeys,
    /// Run id (in every checkpoint).
    run: String,
    /// Round closed, its model not yet stored: checkpoint (round, strategy, state) once it is.
    pending: Option<(u64, String, StrategyState)>,
    /// The latest checkpoint write (awaited before the run returns).
    task: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Checkpoints of run `run`, under `keys`, through `store`.
    pub(super) fn new(store: SealedStore, keys: BlobKeys, run: String) -> Self {
        Self {
            store,
            keys,
            run,
            pending: None,
            task: None,
        }
    }

    /// Round `round` closed with `strategy` in `state`: its checkpoint is written once the model
    /// it produced is stored ([`model_stored`](Self::model_stored)).
    pub(super) fn round_closed(&mut self, round: u64, strategy: String, state: StrategyState) {
        self.pending = Some((round, strategy, state));
    }

    /// Writes the checkpoint of the round that produced `model`, if one is pending; it refers to
    /// the model as the server itself reads it back (its content key wrapped to the server).
    pub(super) async fn model_stored(&mut self, model: &Written) {
        let Some((round, strategy, state)) = self.pending.take() else {
            return;
        };
        let model = match self.store.reference_for(model, SERVER_ID) {
            Ok(m) => m,
            Err(e) => {
                warn!("checkpoint of round {round} not written: {e}");
                return;
            }
        };
        let cp = Checkpoint {
            v: 1,
            run: self.run.clone(),
            round,
            strategy,
            state: serde_json::Value::Null,
            state_blob: None,
            model,
            ts_ms: proto::now_ms(),
        };
        self.put(cp, state).await;
    }

    /// Stores `cp` with the strategy's `state` in the background (encoded, sealed and stored
    /// off the round's critical path), then deletes the checkpoint two rounds older (the newest
    /// two are kept).
    async fn put(&mut self, mut cp: Checkpoint, state: StrategyState) {
        let key = self.keys.checkpoint(cp.round);
        let state_key = self.keys.checkpoint_state(cp.round);
        let old = (cp.round > 2).then(|| {
            (
                self.keys.checkpoint(cp.round - 2),
                self.keys.checkpoint_state(cp.round - 2),
            )
        });
        let store = self.store.clone();
        // One checkpoint in flight at a time, in round order.
        let previous = self.task.take();
        let task = tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            let round = cp.round;
            let sealing = store.clone();
            let encoded = tokio::task::spawn_blocking(move || {
                let (json, tensors) = state.encode();
                cp.state = json;
                let tensors =
                    tensors.map(|t| sealing.seal_own(&state_key, t.to_safetensors_bytes()));
                (cp, tensors)
            })
            .await;
            let (mut cp, tensors) = match encoded {
                Ok(e) => e,
                Err(e) => {
                    warn!("checkpoint of round {round} not written: encoding failed: {e}");
                    return;
                }
            };
            if let Some(blob) = tensors {
                match store.put(&blob).await {
                    Ok(w) => cp.state_blob = Some(w.blob().clone()),
                    Err(e) => {
                        warn!("checkpoint of round {round} not written (its strategy state: {e}); the run goes on without it");
                        return;
                    }
                }
            }
            let body = match serde_json::to_vec_pretty(&cp) {
                Ok(b) => store.seal_own(&key, b),
                Err(e) => {
                    warn!("checkpoint of round {round} not written: {e}");
                    return;
                }
            };
            match store.put(&body).await {
                Ok(_) => {
                    debug!(round, %key, "checkpoint written");
                    if let Some((old, old_state)) = old {
                        let _ = store.inner().delete(&old).await;
                        let _ = store.inner().delete(&old_state).await;
                    }
                }
                Err(e) => warn!(
                    "checkpoint of round {round} not written ({e}); the run goes on without it"
                ),
            }
        });
        self.task = Some(task);
    }

    /// Waits for the checkpoint being written, if any.
    pub(super) async fn wait(&mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
