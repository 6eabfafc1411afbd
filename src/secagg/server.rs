//! The server's side of one securely aggregated round, without I/O: [`ServerSession`] collects
//! each stage's messages, decides who survived it, tells each client what its neighbours did,
//! sums the masked inputs as they arrive and, at the end, removes the masks from the sum.
//!
//! Sets, as in the papers: `U0` advertised keys, `U1 ⊆ U0` shared them, `U2 ⊆ U1` sent a masked
//! input. Each stage closes when everyone still expected has answered, or at its deadline (the
//! round machine decides when); a stage that ends with fewer than `t` clients fails the round,
//! and nothing is unmasked.

use super::agree::KeyPair;
use super::graph::{self, Params};
use super::light::{self, LightParams};
use super::mask::{self, Sign};
use super::quantize::Quantizer;
use super::shamir::{self, Share};
use super::{bundle, context, mask_context, pair_sign, Method, SecAggError};
use crate::proto::secagg::{LIGHT_SECAGG, SECAGG_PLUS};
use crate::proto::{BlobRef, Neighbour, SaKeys, SaReveal, SaRoster, SaUnmask, SecAggSetup};
use std::collections::{BTreeMap, BTreeSet};

/// What closing the shares stage gives each client in `U1`: its neighbours that shared, and
/// its inbox blob's bytes.
pub type Inboxes = BTreeMap<String, (Vec<String>, Vec<u8>)>;

/// The stage a session is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Collecting public keys.
    Keys,
    /// Collecting share bundles.
    Shares,
    /// Collecting masked inputs.
    Masked,
    /// Collecting revealed shares.
    Unmask,
    /// Unmasked, or failed.
    Done,
}

impl Stage {
    /// The stage's name in messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Keys => "advertise keys",
            Stage::Shares => "share keys",
            Stage::Masked => "masked input",
            Stage::Unmask => "unmask",
            Stage::Done => "done",
        }
    }
}

#[derive(Debug, Clone)]
struct Advertised {
    cipher_pk: String,
    mask_pk: [u8; 32],
    weight: u64,
}

/// What one holder revealed.
#[derive(Debug, Default)]
struct Revealed {
    self_masks: BTreeMap<String, Share>,
    mask_keys: BTreeMap<String, Share>,
}

/// The unmasked result of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmasked {
    /// The weighted mean of the survivors' updates (`trained − global`), flattened in the
    /// global model's tensor order.
    pub mean_update: Vec<f32>,
    /// The clients whose inputs are in it.
    pub survivors: Vec<String>,
    /// The per-coordinate bound on the quantization error of `mean_update`.
    pub error_bound: f64,
}

/// The server's state in one securely aggregated round.
#[derive(Debug)]
pub struct ServerSession {
    context: String,
    setup: SecAggSetup,
    params: Params,
    quantizer: Quantizer,
    graph_seed: u64,
    len: usize,
    stage: Stage,
    selected: BTreeSet<String>,
    keys: BTreeMap<String, Advertised>,
    weight_total: u64,
    graph: BTreeMap<String, Vec<String>>,
    /// Share notices taken (their bundles being fetched).
    noticed: BTreeMap<String, BlobRef>,
    /// Checked bundles: `U1`.
    shared: BTreeMap<String, bundle::Entries>,
    masked: BTreeSet<String>,
    sum: Vec<u32>,
    reveals: BTreeMap<String, Revealed>,
    /// LightSecAgg's `U` and `T`, in a LightSecAgg round.
    light: Option<LightParams>,
    /// LightSecAgg: clients whose aggregate mask share was announced / taken.
    mask_share_noticed: BTreeSet<String>,
    mask_shares: BTreeMap<String, Vec<u32>>,
}

impl ServerSession {
    /// A session for `selected` clients in round `round` of run `run`, on models of `len`
    /// parameters. `clip` bounds each coordinate of a weighted update; `method` is the protocol
    /// (SecAgg+'s [`Params`], or LightSecAgg's [`LightParams`]); `graph_seed` fixes SecAgg+'s
    /// neighbour graph; `stage_timeout_ms` is what clients wait per stage.
    ///
    /// # Errors
    /// [`SecAggError::Invalid`]: no client, or no quantizer for this many clients.
    #[allow(clippy::too_many_arguments)] // each is one setting of the round, named at the call
    pub fn new(
        run: &str,
        round: u64,
        selected: &[String],
        method: impl Into<Method>,
        clip: f64,
        graph_seed: u64,
        len: usize,
        stage_timeout_ms: u64,
    ) -> Result<Self, SecAggError> {
        let n = selected.len();
        let (params, light) = match method.into() {
            Method::Plus(p) => (p, None),
            Method::Light(l) => {
                // Every client holds a coded share of every other's mask: the complete graph,
                // and the unmask stage needs `U` aggregate shares.
                let p = Params {
                    threshold: l.active,
                    degree: n.saturating_sub(1),
                };
                (p, Some(l))
            }
        };
        let bits = match light {
            Some(_) => light::max_bits(n as u64),
            None => Quantizer::max_bits(n as u64),
        };
        let quantizer = Quantizer::with_bits(clip as f32, bits, n as u64)
            .map_err(|e| SecAggError::Invalid(format!("secure aggregation: {e}")))?;
        let setup = SecAggSetup {
            method: if light.is_some() {
                LIGHT_SECAGG
            } else {
                SECAGG_PLUS
            }
            .into(),
            threshold: params.threshold as u32,
            degree: params.degree as u32,
            selected: n as u32,
            clip,
            bits: quantizer.bits(),
            stage_timeout_ms,
            privacy: light.map_or(0, |l| l.privacy as u32),
            length: if light.is_some() { len as u64 } else { 0 },
        };
        Ok(Self {
            context: context(run, round),
            setup,
            params,
            quantizer,
            graph_seed,
            len,
            stage: Stage::Keys,
            selected: selected.iter().cloned().collect(),
            keys: BTreeMap::new(),
            weight_total: 0,
            graph: BTreeMap::new(),
            noticed: BTreeMap::new(),
            shared: BTreeMap::new(),
            masked: BTreeSet::new(),
            sum: Vec::new(),
            reveals: BTreeMap::new(),
            light,
            mask_share_noticed: BTreeSet::new(),
            mask_shares: BTreeMap::new(),
        })
    }

    /// LightSecAgg's parameters, in a LightSecAgg round.
    pub fn light(&self) -> Option<LightParams> {
        self.light
    }

    /// What the train commands carry.
    pub fn setup(&self) -> &SecAggSetup {
        &self.setup
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The threshold `t`.
    pub fn threshold(&self) -> usize {
        self.params.threshold
    }

    /// The clients still expected to answer the current stage.
    pub fn expected(&self) -> BTreeSet<String> {
        match self.stage {
            Stage::Keys => self.selected.clone(),
            Stage::Shares => self.keys.keys().cloned().collect(),
            Stage::Masked => self.shared.keys().cloned().collect(),
            Stage::Unmask => self.masked.clone(),
            Stage::Done => BTreeSet::new(),
        }
    }

    /// Clients of the current stage that answered.
    pub fn answered(&self) -> BTreeSet<String> {
        match self.stage {
            Stage::Keys => self.keys.keys().cloned().collect(),
            Stage::Shares => self.shared.keys().cloned().collect(),
            Stage::Masked => self.masked.clone(),
            Stage::Unmask if self.light.is_some() => self.mask_shares.keys().cloned().collect(),
            Stage::Unmask => self.reveals.keys().cloned().collect(),
            Stage::Done => BTreeSet::new(),
        }
    }

    fn expect(&self, stage: Stage, client: &str) -> Result<(), SecAggError> {
        if self.stage != stage {
            return Err(SecAggError::Refused(format!(
                "a {} message during the {} stage",
                stage.name(),
                self.stage.name()
            )));
        }
        if !self.expected().contains(client) {
            return Err(SecAggError::Refused(format!(
                "{client} is not expected in the {} stage",
                stage.name()
            )));
        }
        if self.answered().contains(client) {
            return Err(SecAggError::Refused(format!(
                "{client} already answered the {} stage",
                stage.name()
            )));
        }
        Ok(())
    }

    /// Stage 0: `client`'s keys, with the weight the server gives it.
    ///
    /// # Errors
    /// [`SecAggError::Refused`]: out of stage, not selected, a repeat, or keys another client
    /// advertised already (a replayed advertisement).
    pub fn add_keys(
        &mut self,
        client: &str,
        keys: &SaKeys,
        weight: u64,
    ) -> Result<(), SecAggError> {
        self.expect(Stage::Keys, client)?;
        let mut mask_pk = [0u8; 32];
        hex::decode_to_slice(&keys.mask_pk, &mut mask_pk)
            .map_err(|_| SecAggError::Invalid("mask_pk is not hex".into()))?;
        if self
            .keys
            .values()
            .any(|a| a.mask_pk == mask_pk || a.cipher_pk == keys.cipher_pk)
        {
            return Err(SecAggError::Refused(format!(
                "{client} advertised keys another client uses"
            )));
        }
        self.keys.insert(
            client.to_string(),
            Advertised {
                cipher_pk: keys.cipher_pk.clone(),
                mask_pk,
                weight: weight.max(1),
            },
        );
        Ok(())
    }

    fn need(&self, what: &str, got: usize) -> Result<(), SecAggError> {
        if got < self.params.threshold {
            return Err(SecAggError::BelowThreshold {
                what: what.to_string(),
                got,
                needed: self.params.threshold,
            });
        }
        Ok(())
    }

    fn fail<T>(&mut self, e: SecAggError) -> Result<T, SecAggError> {
        self.stage = Stage::Done;
        Err(e)
    }

    /// Closes stage 0: the roster for each client that advertised keys.
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] when fewer than `t` clients advertised keys.
    pub fn rosters(&mut self) -> Result<BTreeMap<String, SaRoster>, SecAggError> {
        if let Err(e) = self.need("clients that advertised keys", self.keys.len()) {
            return self.fail(e);
        }
        let ids: Vec<String> = self.keys.keys().cloned().collect();
        self.graph = graph::neighbours(&ids, self.params.degree, self.graph_seed);
        if let Some(small) = self.graph.values().map(Vec::len).min() {
            if let Err(e) = self.need("holders in the smallest neighbourhood", small + 1) {
                return self.fail(e);
            }
        }
        self.weight_total = self.keys.values().map(|a| a.weight).sum();
        self.stage = Stage::Shares;
        Ok(self
            .graph
            .iter()
            .map(|(c, ns)| {
                let neighbours = ns
                    .iter()
                    .map(|n| {
                        let a = &self.keys[n];
                        Neighbour {
                            id: n.clone(),
                            cipher_pk: a.cipher_pk.clone(),
                            mask_pk: hex::encode(a.mask_pk),
                        }
                    })
                    .collect();
                let roster = SaRoster {
                    neighbours,
                    weight: self.keys[c].weight,
                    weight_total: self.weight_total,
                };
                (c.clone(), roster)
            })
            .collect())
    }

    /// Stage 1: `client` says its share bundle is stored at `bundle` (its own bundle key,
    /// checked by the caller, who then fetches it for [`ServerSession::add_bundle`]).
    ///
    /// # Errors
    /// [`SecAggError::Refused`]: out of stage, not in `U0`, or a repeat.
    pub fn add_shares(&mut self, client: &str, bundle: BlobRef) -> Result<(), SecAggError> {
        self.expect(Stage::Shares, client)?;
        if self.noticed.contains_key(client) {
            return Err(SecAggError::Refused(format!(
                "{client} announced its bundle already"
            )));
        }
        self.noticed.insert(client.to_string(), bundle);
        Ok(())
    }

    /// Stage 1: the bytes of `client`'s announced bundle, checked (one well-formed entry for
    /// each of its neighbours, this round's, its own) and kept: `client` is then in `U1`.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] out of stage or without a notice; [`SecAggError::Invalid`] for a
    /// bundle that does not check out.
    pub fn add_bundle(&mut self, client: &str, bytes: &[u8]) -> Result<(), SecAggError> {
        self.expect(Stage::Shares, client)?;
        if !self.noticed.contains_key(client) {
            return Err(SecAggError::Refused(format!(
                "{client} announced no bundle"
            )));
        }
        let holders = &self.graph[client];
        let entries = match self.light {
            Some(l) => {
                light::check_bundle(bytes, &self.context, client, holders, l.share_len(self.len))?
            }
            None => bundle::check_bundle(bytes, &self.context, client, holders)?,
        };
        self.shared.insert(client.to_string(), entries);
        Ok(())
    }

    /// Closes stage 1: for each client that shared, its neighbours that shared and its inbox
    /// (the blob to store for it: the entry addressed to it from each of them).
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] when fewer than `t` clients shared.
    pub fn collects(&mut self) -> Result<Inboxes, SecAggError> {
        if let Err(e) = self.need("clients that shared their keys", self.shared.len()) {
            return self.fail(e);
        }
        self.stage = Stage::Masked;
        self.sum = vec![0u32; self.len];
        // Each entry goes to exactly one inbox: it is moved there, so the bundles' memory is
        // released as the inboxes grow (LightSecAgg's entries are large).
        let holders: Vec<String> = self.shared.keys().cloned().collect();
        let mut out = Inboxes::new();
        for c in holders {
            let mut from: Vec<(String, Vec<u8>)> = Vec::new();
            for n in &self.graph[&c] {
                if let Some(ct) = self.shared.get_mut(n).and_then(|e| e.remove(&c)) {
                    from.push((n.clone(), ct));
                }
            }
            let views: Vec<(&str, &[u8])> = from
                .iter()
                .map(|(n, ct)| (n.as_str(), ct.as_slice()))
                .collect();
            let inbox = match self.light {
                Some(_) => light::encode_inbox(&self.context, &c, &views),
                None => bundle::encode_inbox(&self.context, &c, &views),
            };
            let sharing = from.into_iter().map(|(n, _)| n).collect();
            out.insert(c, (sharing, inbox));
        }
        Ok(out)
    }

    /// Whether `client` may send a masked input now (before it is fetched).
    ///
    /// # Errors
    /// [`SecAggError::Refused`]: out of stage, not in `U1`, or a repeat.
    pub fn expects_masked(&self, client: &str) -> Result<(), SecAggError> {
        self.expect(Stage::Masked, client)
    }

    /// Stage 2: `client`'s masked input, folded into the sum at once.
    ///
    /// # Errors
    /// As [`ServerSession::expects_masked`]; [`SecAggError::Invalid`] for a wrong length.
    pub fn add_masked(&mut self, client: &str, masked: &[u32]) -> Result<(), SecAggError> {
        self.expect(Stage::Masked, client)?;
        if masked.len() != self.len {
            return Err(SecAggError::Invalid(format!(
                "{client}'s masked input has {} values, the model {}",
                masked.len(),
                self.len
            )));
        }
        if self.light.is_some() {
            if masked.iter().any(|m| u64::from(*m) >= light::Q) {
                return Err(SecAggError::Invalid(format!(
                    "{client}'s masked input holds values outside the field"
                )));
            }
            for (s, m) in self.sum.iter_mut().zip(masked) {
                *s = light::add(*s, *m);
            }
        } else {
            for (s, m) in self.sum.iter_mut().zip(masked) {
                *s = s.wrapping_add(*m);
            }
        }
        self.masked.insert(client.to_string());
        Ok(())
    }

    /// Closes stage 2: the unmask request for each client whose masked input arrived.
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] when fewer than `t` masked inputs arrived.
    pub fn unmask_requests(&mut self) -> Result<BTreeMap<String, SaUnmask>, SecAggError> {
        if let Err(e) = self.need("masked inputs", self.masked.len()) {
            return self.fail(e);
        }
        self.stage = Stage::Unmask;
        if self.light.is_some() {
            // Every survivor sums the coded shares it holds from all survivors.
            let survivors: Vec<String> = self.masked.iter().cloned().collect();
            return Ok(self
                .masked
                .iter()
                .map(|c| {
                    let req = SaUnmask {
                        survivors: survivors.clone(),
                        dropped: Vec::new(),
                    };
                    (c.clone(), req)
                })
                .collect());
        }
        Ok(self
            .masked
            .iter()
            .map(|c| {
                let (mut survivors, mut dropped) = (Vec::new(), Vec::new());
                for n in &self.graph[c] {
                    if self.masked.contains(n) {
                        survivors.push(n.clone());
                    } else if self.shared.contains_key(n) {
                        dropped.push(n.clone());
                    }
                }
                (c.clone(), SaUnmask { survivors, dropped })
            })
            .collect())
    }

    /// Stage 3: what `client` revealed. Each share must be of a neighbour in the category the
    /// request named (self-mask shares of survivors, mask-key shares of the dropped) and at the
    /// client's own evaluation point.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] out of stage or for a share the client was not asked for;
    /// [`SecAggError::Invalid`] for a malformed share.
    pub fn add_reveal(&mut self, client: &str, reveal: &SaReveal) -> Result<(), SecAggError> {
        self.expect(Stage::Unmask, client)?;
        if self.light.is_some() || reveal.mask_share.is_some() {
            return Err(SecAggError::Refused(
                "LightSecAgg reveals an aggregate mask share, SecAgg+ shares".into(),
            ));
        }
        let mut got = Revealed::default();
        for (list, is_key) in [(&reveal.self_masks, false), (&reveal.mask_keys, true)] {
            for r in list {
                let owner = &r.of;
                let related = owner == client || self.graph[client].contains(owner);
                let in_category = if is_key {
                    self.shared.contains_key(owner) && !self.masked.contains(owner)
                } else {
                    self.masked.contains(owner)
                };
                if !related || !in_category {
                    return Err(SecAggError::Refused(format!(
                        "{client} revealed a {} share of {owner} that was not asked for",
                        if is_key { "mask-key" } else { "self-mask" }
                    )));
                }
                let bytes = hex::decode(&r.share)
                    .map_err(|_| SecAggError::Invalid("a share is not hex".into()))?;
                let share = Share::from_bytes(&bytes)?;
                let holders = graph::holders(owner, &self.graph[owner]);
                let position = holders.iter().position(|h| *h == client);
                if position.map(|p| p + 1) != Some(usize::from(share.x)) {
                    return Err(SecAggError::Refused(format!(
                        "{client} revealed a share of {owner} at another holder's point"
                    )));
                }
                if is_key {
                    got.mask_keys.insert(owner.clone(), share);
                } else {
                    got.self_masks.insert(owner.clone(), share);
                }
            }
        }
        self.reveals.insert(client.to_string(), got);
        Ok(())
    }

    /// LightSecAgg, stage 3: `client` says its aggregate mask share is stored (its own key,
    /// checked by the caller, who fetches it for [`ServerSession::add_mask_share`]).
    ///
    /// # Errors
    /// [`SecAggError::Refused`]: not a LightSecAgg round, out of stage, not a survivor, or a
    /// repeat.
    pub fn note_mask_share(&mut self, client: &str) -> Result<(), SecAggError> {
        self.expect(Stage::Unmask, client)?;
        if self.light.is_none() {
            return Err(SecAggError::Refused(
                "an aggregate mask share in a SecAgg+ round".into(),
            ));
        }
        if !self.mask_share_noticed.insert(client.to_string()) {
            return Err(SecAggError::Refused(format!(
                "{client} announced its aggregate mask share already"
            )));
        }
        Ok(())
    }

    /// LightSecAgg, stage 3: the bytes of `client`'s announced aggregate mask share.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] out of stage or without a notice; [`SecAggError::Invalid`] for a
    /// blob that is not one share of this round's length.
    pub fn add_mask_share(&mut self, client: &str, blob: &[u8]) -> Result<(), SecAggError> {
        self.expect(Stage::Unmask, client)?;
        let Some(l) = self.light else {
            return Err(SecAggError::Refused("not a LightSecAgg round".into()));
        };
        if !self.mask_share_noticed.contains(client) {
            return Err(SecAggError::Refused(format!(
                "{client} announced no aggregate mask share"
            )));
        }
        let share = light::decode_aggregate(blob, l.share_len(self.len))?;
        self.mask_shares.insert(client.to_string(), share);
        Ok(())
    }

    /// LightSecAgg: removes the survivors' aggregate mask, decoded from `U` aggregate shares
    /// (a spare share, when there is one, checks the others).
    fn light_unmask(&self, l: LightParams, sum: &mut [u32]) -> Result<(), SecAggError> {
        // A client's point is its 1-based position among those that advertised keys (the
        // holders every roster named).
        let position = |c: &str| self.keys.keys().position(|k| k == c).map(|p| p as u32 + 1);
        let sums: Vec<(u32, &[u32])> = self
            .mask_shares
            .iter()
            .filter_map(|(c, v)| Some((position(c)?, v.as_slice())))
            .collect();
        let n = self.keys.len();
        let aggregate = light::decode(&sums, n, l, self.len)?;
        if let Some((x, spare)) = sums.get(l.active) {
            if !light::consistent(&sums[..l.active], *x, spare) {
                return Err(SecAggError::Invalid(
                    "the aggregate mask shares are inconsistent (a client sent a wrong one)".into(),
                ));
            }
        }
        for (s, z) in sum.iter_mut().zip(aggregate) {
            *s = light::sub(*s, z);
        }
        Ok(())
    }

    /// The secrets the server must recover: survivors' self-mask seeds, and the mask keys of
    /// dropped clients with a surviving neighbour.
    fn needed(&self) -> (Vec<&String>, Vec<&String>) {
        let survivors: Vec<&String> = self.masked.iter().collect();
        let dropped: Vec<&String> = self
            .shared
            .keys()
            .filter(|d| !self.masked.contains(*d))
            .filter(|d| self.graph[*d].iter().any(|n| self.masked.contains(n)))
            .collect();
        (survivors, dropped)
    }

    fn shares_of(&self, owner: &str, key: bool) -> Vec<Share> {
        self.reveals
            .values()
            .filter_map(|r| {
                if key {
                    r.mask_keys.get(owner)
                } else {
                    r.self_masks.get(owner)
                }
            })
            .cloned()
            .collect()
    }

    /// Whether every needed secret has `t` shares (the unmask stage may close early).
    pub fn ready(&self) -> bool {
        if let Some(l) = self.light {
            return self.mask_shares.len() >= l.active;
        }
        let (survivors, dropped) = self.needed();
        let t = self.params.threshold;
        survivors
            .iter()
            .all(|s| self.shares_of(s, false).len() >= t)
            && dropped.iter().all(|d| self.shares_of(d, true).len() >= t)
    }

    fn recover(&self, owner: &str, key: bool) -> Result<[u8; 32], SecAggError> {
        let shares = self.shares_of(owner, key);
        let t = self.params.threshold;
        let what = if key { "mask key" } else { "self-mask seed" };
        if shares.len() < t {
            return Err(SecAggError::BelowThreshold {
                what: format!("shares of {owner}'s {what}"),
                got: shares.len(),
                needed: t,
            });
        }
        // A share altered in transit or by its holder makes the interpolation inconsistent;
        // with spare shares, leaving each one out in turn finds a consistent set.
        match shamir::recover(&shares, t) {
            Ok(s) => return Ok(s),
            Err(e) if shares.len() == t => return Err(e.into()),
            Err(_) => {}
        }
        for skip in 0..shares.len() {
            let rest: Vec<Share> = shares
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, s)| s.clone())
                .collect();
            if let Ok(s) = shamir::recover(&rest, t) {
                return Ok(s);
            }
        }
        Err(SecAggError::Invalid(format!(
            "the shares of {owner}'s {what} are inconsistent"
        )))
    }

    /// Closes stage 3: removes the masks and returns the survivors' weighted mean update.
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] when a needed secret has fewer than `t` shares;
    /// [`SecAggError::Invalid`] when shares do not recover a secret.
    pub fn finish(&mut self) -> Result<Unmasked, SecAggError> {
        if self.stage != Stage::Unmask {
            return Err(SecAggError::Refused(format!(
                "unmasking during the {} stage",
                self.stage.name()
            )));
        }
        if let Some(l) = self.light {
            let mut sum = std::mem::take(&mut self.sum);
            if let Err(e) = self.light_unmask(l, &mut sum) {
                return self.fail(e);
            }
            return Ok(self.unmasked(&sum));
        }
        let (survivors, dropped) = self.needed();
        let mut seeds = Vec::with_capacity(survivors.len());
        for s in &survivors {
            match self.recover(s, false) {
                Ok(seed) => seeds.push(seed),
                Err(e) => return self.fail(e),
            }
        }
        let mut pair_masks = Vec::new();
        let ctx = mask_context(&self.context);
        for d in &dropped {
            let secret = match self.recover(d, true) {
                Ok(s) => s,
                Err(e) => return self.fail(e),
            };
            let keys = KeyPair::from_secret(secret);
            if keys.public() != self.keys[*d].mask_pk {
                return self.fail(SecAggError::Invalid(format!(
                    "the shares of {d}'s mask key recover another key"
                )));
            }
            for u in self.graph[*d].iter().filter(|u| self.masked.contains(*u)) {
                let seed = match keys.pairwise_seed(&self.keys[u].mask_pk, ctx.as_bytes()) {
                    Ok(s) => s,
                    Err(e) => {
                        return self.fail(SecAggError::Invalid(format!("{u}'s mask key: {e}")))
                    }
                };
                // `u` added its pairwise mask with `d` under `pair_sign(u, d)`; remove it.
                let sign = match pair_sign(u, d) {
                    Sign::Add => Sign::Sub,
                    Sign::Sub => Sign::Add,
                };
                pair_masks.push((seed, sign));
            }
        }
        let mut sum = std::mem::take(&mut self.sum);
        for seed in &seeds {
            mask::apply(seed, Sign::Sub, &mut sum);
        }
        for (seed, sign) in &pair_masks {
            mask::apply(seed, *sign, &mut sum);
        }
        Ok(self.unmasked(&sum))
    }

    /// The survivors' weighted mean from the unmasked sum of their quantized inputs.
    fn unmasked(&mut self, sum: &[u32]) -> Unmasked {
        let n = self.masked.len() as u64;
        let share: f64 = self
            .masked
            .iter()
            .map(|c| self.keys[c].weight as f64)
            .sum::<f64>()
            / self.weight_total as f64;
        let mean_update = sum
            .iter()
            .map(|s| (self.quantizer.dequantize_sum(*s, n) / share) as f32)
            .collect();
        self.stage = Stage::Done;
        Unmasked {
            mean_update,
            survivors: self.masked.iter().cloned().collect(),
            error_bound: self.quantizer.sum_error_bound(n) / share,
        }
    }

    /// Clients whose revealed shares (or aggregate mask shares) were taken.
    pub fn revealed(&self) -> usize {
        self.reveals.len() + self.mask_shares.len()
    }

    /// The clients that advertised keys, with the weights given them.
    pub fn weights(&self) -> BTreeMap<String, u64> {
        self.keys
            .iter()
            .map(|(c, a)| (c.clone(), a.weight))
            .collect()
    }

    /// Whether everyone expected in the current stage answered (or dropped out).
    pub fn stage_complete(&self, dropped: &BTreeSet<String>) -> bool {
        let answered = self.answered();
        self.expected()
            .iter()
            .all(|c| answered.contains(c) || dropped.contains(c))
    }
}
