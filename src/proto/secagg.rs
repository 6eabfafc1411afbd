//! The messages of secure aggregation (SecAgg+, `docs/PROTOCOL.md`, "Secure aggregation"):
//! what a train command adds when its round is securely aggregated, and the four stages
//! (advertise keys, share keys, masked input, unmask) as message bodies.
//!
//! Public keys travel as 64 lowercase hex digits, Shamir shares as 132 (66 bytes, the wire form
//! of [`crate::secagg::shamir::Share`]). Bulky data is in blobs: a client's encrypted share
//! bundle ([`SaShares`]), the inbox the server gathers for it ([`SaCollect`]) and its masked input
//! ([`SaMasked`]).

use super::{valid_id, BlobRef, TrainMetrics};
use serde::{Deserialize, Serialize};

/// The method name this build speaks: SecAgg+ (Bell et al., CCS 2020).
pub const SECAGG_PLUS: &str = "secagg_plus";

/// LightSecAgg (So et al., MLSys 2022).
pub const LIGHT_SECAGG: &str = "lightsecagg";

/// Hex digits of an X25519 public key.
pub const PUBLIC_KEY_HEX_LEN: usize = 64;

/// Hex digits of a Shamir share (66 bytes).
pub const SHARE_HEX_LEN: usize = 132;

/// Most neighbours (or listed clients) one secure-aggregation message may name.
pub const MAX_LISTED: usize = 4096;

/// Sent with a train command when the round is securely aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    /// The protocol: [`SECAGG_PLUS`] or [`LIGHT_SECAGG`].
    pub method: String,
    /// SecAgg+: shares needed to recover a secret (`t`). LightSecAgg: aggregate mask shares
    /// needed to unmask (`U`).
    pub threshold: u32,
    /// Neighbours per client (`k`); the complete graph when it is `selected − 1`.
    pub degree: u32,
    /// Clients selected for the round (`N`): bounds the quantizer's headroom.
    pub selected: u32,
    /// Updates are clipped to `[−clip, clip]` per coordinate before quantization.
    pub clip: f64,
    /// Bits per quantized value (`b`); `selected · (2^b − 1) < 2^32`.
    pub bits: u32,
    /// Time a client gives each stage after the previous one, in milliseconds.
    pub stage_timeout_ms: u64,
    /// LightSecAgg only: colluding clients that learn nothing of one client's mask (`T`,
    /// below `threshold`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub privacy: u32,
    /// LightSecAgg only: values in a masked input (the model's parameters).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub length: u64,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Stage 0, client → server: this round's public keys and the client's sample count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaKeys {
    /// X25519 key its neighbours encrypt shares to (hex).
    pub cipher_pk: String,
    /// X25519 key its pairwise masks are agreed with (hex).
    pub mask_pk: String,
    /// Samples it trains on (its weight, bounded by what it announced when it joined).
    pub num_samples: u64,
}

/// One neighbour as the roster names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    /// Client id.
    pub id: String,
    /// Its [`SaKeys::cipher_pk`].
    pub cipher_pk: String,
    /// Its [`SaKeys::mask_pk`].
    pub mask_pk: String,
}

/// Stage 1, server → client: its neighbours' keys and its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaRoster {
    /// The recipient's neighbours that advertised keys, sorted by id.
    pub neighbours: Vec<Neighbour>,
    /// The recipient's weight (its samples, or 1 with uniform weighting).
    pub weight: u64,
    /// The sum of the weights of every client that advertised keys: the recipient scales its
    /// update by `weight / weight_total` before masking.
    pub weight_total: u64,
}

/// Stage 1, client → server: its encrypted share bundle is in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaShares {
    /// The bundle (`…/r<round>/shares/<client>`).
    pub bundle: BlobRef,
}

/// Stage 2, server → client: the neighbours whose shares arrived (the client masks with these
/// alone), and the client's inbox: its share from each of them, gathered by the server from their
/// bundles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaCollect {
    /// Neighbours that shared, sorted by id.
    pub sharing: Vec<String>,
    /// The inbox blob (`…/r<round>/inbox/<client>`).
    pub inbox: BlobRef,
}

/// Stage 2, client → server: its masked input is in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaMasked {
    /// The masked input (`…/r<round>/updates/<client>`).
    pub masked: BlobRef,
    /// Samples it trained on.
    pub num_samples: u64,
    /// Training metrics.
    pub metrics: TrainMetrics,
}

/// Stage 3, server → client: which of its neighbours' masked inputs arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaUnmask {
    /// Neighbours whose masked input arrived: their self-mask shares are asked for.
    pub survivors: Vec<String>,
    /// Neighbours that shared but sent no masked input: their mask-key shares are asked for.
    pub dropped: Vec<String>,
}

/// A share the client reveals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret it is a share of.
    pub of: String,
    /// The share (132 hex digits).
    pub share: String,
}

/// Stage 3, client → server: the shares asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaReveal {
    /// Shares of survivors' self-mask seeds.
    pub self_masks: Vec<RevealedShare>,
    /// Shares of dropped clients' mask keys.
    pub mask_keys: Vec<RevealedShare>,
    /// LightSecAgg (with both lists empty): the blob holding the sum of the coded mask shares
    /// this client holds from the survivors (`…/r<round>/reveal/<client>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_share: Option<BlobRef>,
}

pub(super) fn check_hex(field: &str, s: &str, len: usize) -> Result<(), String> {
    if s.len() != len || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("{field} must be {len} lowercase hex digits"));
    }
    Ok(())
}

fn check_ids<'a>(field: &str, ids: impl ExactSizeIterator<Item = &'a str>) -> Result<(), String> {
    if ids.len() > MAX_LISTED {
        return Err(format!("{field} names more than {MAX_LISTED} clients"));
    }
    let mut prev: Option<&str> = None;
    for id in ids {
        if !valid_id(id) {
            return Err(format!("{field} holds an invalid client id"));
        }
        if prev.is_some_and(|p| p >= id) {
            return Err(format!("{field} must be sorted by id without repeats"));
        }
        prev = Some(id);
    }
    Ok(())
}

impl SecAggSetup {
    pub(super) fn validate(&self) -> Result<(), String> {
        let light = self.method == LIGHT_SECAGG;
        if self.method != SECAGG_PLUS && !light {
            return Err(format!(
                "secagg.method {:?} is not {SECAGG_PLUS:?} or {LIGHT_SECAGG:?}",
                self.method.chars().take(40).collect::<String>()
            ));
        }
        if self.selected == 0 || self.selected as usize > MAX_LISTED {
            return Err(format!("secagg.selected must be in 1..={MAX_LISTED}"));
        }
        if self.degree >= self.selected {
            return Err("secagg.degree must be below secagg.selected".into());
        }
        if self.threshold == 0 || self.threshold > self.degree + 1 {
            return Err("secagg.threshold must be in 1..=degree + 1".into());
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip <= f64::from(f32::MAX)) {
            return Err("secagg.clip must be a finite number > 0".into());
        }
        if light {
            if self.degree + 1 != self.selected {
                return Err("secagg.degree must be selected − 1 for LightSecAgg".into());
            }
            if self.privacy >= self.threshold {
                return Err("secagg.privacy must be below secagg.threshold".into());
            }
            if self.length == 0 || self.length > 1 << 34 {
                return Err("secagg.length must be in 1..=2^34 for LightSecAgg".into());
            }
        } else if self.privacy != 0 || self.length != 0 {
            return Err("secagg.privacy and secagg.length are LightSecAgg's".into());
        }
        let headroom = if light {
            crate::secagg::light::max_bits(u64::from(self.selected))
        } else {
            32 - u64::from(self.selected)
                .next_power_of_two()
                .trailing_zeros()
        };
        if self.bits == 0 || self.bits > headroom {
            return Err(format!(
                "secagg.bits must be in 1..={headroom} for {} clients",
                self.selected
            ));
        }
        Ok(())
    }
}

impl SaKeys {
    pub(super) fn validate(&self) -> Result<(), String> {
        check_hex("cipher_pk", &self.cipher_pk, PUBLIC_KEY_HEX_LEN)?;
        check_hex("mask_pk", &self.mask_pk, PUBLIC_KEY_HEX_LEN)?;
        if self.cipher_pk == self.mask_pk {
            return Err("cipher_pk and mask_pk must differ".into());
        }
        if self.num_samples == 0 {
            return Err("num_samples must be ≥ 1".into());
        }
        Ok(())
    }
}

impl SaRoster {
    pub(super) fn validate(&self) -> Result<(), String> {
        check_ids("neighbours", self.neighbours.iter().map(|n| n.id.as_str()))?;
        for n in &self.neighbours {
            check_hex("neighbours.cipher_pk", &n.cipher_pk, PUBLIC_KEY_HEX_LEN)?;
            check_hex("neighbours.mask_pk", &n.mask_pk, PUBLIC_KEY_HEX_LEN)?;
        }
        if self.weight == 0 || self.weight > self.weight_total {
            return Err("weight must be in 1..=weight_total".into());
        }
        Ok(())
    }
}

impl SaCollect {
    pub(super) fn validate(&self) -> Result<(), String> {
        check_ids("sharing", self.sharing.iter().map(String::as_str))?;
        self.inbox.validate("inbox")
    }
}

impl SaMasked {
    pub(super) fn validate(&self) -> Result<(), String> {
        self.masked.validate("masked")?;
        if self.num_samples == 0 {
            return Err("num_samples must be ≥ 1".into());
        }
        self.metrics.validate()
    }
}

impl SaUnmask {
    pub(super) fn validate(&self) -> Result<(), String> {
        check_ids("survivors", self.survivors.iter().map(String::as_str))?;
        check_ids("dropped", self.dropped.iter().map(String::as_str))?;
        Ok(())
    }
}

impl SaReveal {
    pub(super) fn validate(&self) -> Result<(), String> {
        for (field, list) in [
            ("self_masks", &self.self_masks),
            ("mask_keys", &self.mask_keys),
        ] {
            check_ids(field, list.iter().map(|s| s.of.as_str()))?;
            for s in list {
                check_hex(field, &s.share, SHARE_HEX_LEN)?;
            }
        }
        if let Some(b) = &self.mask_share {
            if !(self.self_masks.is_empty() && self.mask_keys.is_empty()) {
                return Err("mask_share comes without revealed shares".into());
            }
            b.validate("mask_share")?;
        }
        Ok(())
    }
}
