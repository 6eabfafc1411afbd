//! A client's side of one securely aggregated round, without I/O: [`ClientSession`] turns the
//! server's stage messages into what the client sends back (keys, an encrypted share bundle, a
//! masked input, revealed shares), and refuses what the protocol forbids.
//!
//! The driver (`client::secure`) moves the bytes: it publishes the messages, stores and fetches
//! the blobs, and trains in parallel with the first two stages.

use super::agree::KeyPair;
use super::graph;
use super::light::{self, LightParams};
use super::mask::{self, Seed, Sign};
use super::quantize::Quantizer;
use super::shamir::{self, Share};
use super::{bundle, context, SecAggError};
use crate::proto::secagg::LIGHT_SECAGG;
use crate::proto::{RevealedShare, SaCollect, SaKeys, SaReveal, SaRoster, SaUnmask, SecAggSetup};
use crate::tensor::ParamSet;
use rand::{CryptoRng, Rng};
use std::collections::{BTreeMap, BTreeSet};

/// Where a client's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Keys advertised; waiting for the roster.
    Advertised,
    /// Shares sent; waiting for the list of neighbours that shared.
    Shared,
    /// Neighbours' shares in hand; ready to mask.
    Collected,
    /// Masked input sent; waiting for the unmask request.
    Masked,
}

/// A neighbour's public keys.
#[derive(Debug, Clone)]
struct Peer {
    cipher_pk: [u8; 32],
    mask_pk: [u8; 32],
}

/// The shares this client holds of one owner's secrets.
#[derive(Debug, Clone)]
struct Held {
    self_mask: Share,
    mask_key: Share,
}

/// A LightSecAgg client's state: its mask is [`light::mask_of`] its self-mask seed.
#[derive(Debug, Clone)]
struct Light {
    params: LightParams,
    /// Values in the masked input.
    len: usize,
    /// Coded shares held: each owner's share at this client's point (its own included).
    held: BTreeMap<String, Vec<u32>>,
    /// Whether the aggregate share was sent.
    answered: bool,
}

/// What a client reveals in the unmask stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Reveal {
    /// SecAgg+: the shares asked for.
    Shares(SaReveal),
    /// LightSecAgg: the sum of the coded mask shares held from the survivors (stored as a
    /// blob, [`light::encode_aggregate`]).
    MaskShare(Vec<u32>),
}

/// One client's state in one securely aggregated round.
#[derive(Clone)]
pub struct ClientSession {
    id: String,
    context: String,
    threshold: usize,
    quantizer: Quantizer,
    cipher: KeyPair,
    mask: KeyPair,
    self_seed: Seed,
    stage: Stage,
    peers: BTreeMap<String, Peer>,
    weight: (u64, u64),
    /// Neighbours that shared (from the collect message): the ones masked with.
    sharing: BTreeSet<String>,
    /// Shares of each owner's secrets this client holds (its own included).
    held: BTreeMap<String, Held>,
    /// Owners whose self-mask share was revealed / whose mask-key share was revealed.
    revealed_self: BTreeSet<String>,
    revealed_keys: BTreeSet<String>,
    /// LightSecAgg's state, in a LightSecAgg round.
    light: Option<Light>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("id", &self.id)
            .field("context", &self.context)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

fn parse_key(field: &str, hex_key: &str) -> Result<[u8; 32], SecAggError> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut k)
        .map_err(|_| SecAggError::Invalid(format!("{field} is not 64 hex digits")))?;
    Ok(k)
}

impl ClientSession {
    /// A session of client `id` in round `round` of run `run`, and the keys to advertise.
    ///
    /// # Errors
    /// [`SecAggError::Invalid`]: a setup whose quantizer cannot be built.
    pub fn new(
        run: &str,
        round: u64,
        id: &str,
        setup: &SecAggSetup,
        num_samples: u64,
    ) -> Result<(Self, SaKeys), SecAggError> {
        let quantizer =
            Quantizer::with_bits(setup.clip as f32, setup.bits, u64::from(setup.selected))
                .map_err(|e| SecAggError::Invalid(format!("secagg setup: {e}")))?;
        let light = (setup.method == LIGHT_SECAGG).then(|| Light {
            params: LightParams {
                active: setup.threshold as usize,
                privacy: setup.privacy as usize,
            },
            len: setup.length as usize,
            held: BTreeMap::new(),
            answered: false,
        });
        if let Some(l) = &light {
            if l.params.privacy >= l.params.active || l.len == 0 {
                return Err(SecAggError::Invalid(
                    "secagg setup: LightSecAgg needs privacy < threshold and a length".into(),
                ));
            }
        }
        let cipher = KeyPair::generate();
        let mask = KeyPair::generate();
        let mut self_seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut self_seed);
        let keys = SaKeys {
            cipher_pk: hex::encode(cipher.public()),
            mask_pk: hex::encode(mask.public()),
            num_samples,
        };
        Ok((
            Self {
                id: id.to_string(),
                context: context(run, round),
                threshold: setup.threshold as usize,
                quantizer,
                cipher,
                mask,
                self_seed,
                stage: Stage::Advertised,
                peers: BTreeMap::new(),
                weight: (0, 1),
                sharing: BTreeSet::new(),
                held: BTreeMap::new(),
                revealed_self: BTreeSet::new(),
                revealed_keys: BTreeSet::new(),
                light,
            },
            keys,
        ))
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stage 1: the roster names the neighbours; the result is the share bundle to store (its
    /// wire form, `bundle` module): each neighbour's shares of this client's self-mask seed and
    /// mask key, encrypted to that neighbour.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] out of order or when the roster lists this client, too few
    /// holders for the threshold, or a key that cannot be agreed with.
    pub fn on_roster<R: Rng + CryptoRng>(
        &mut self,
        roster: &SaRoster,
        rng: &mut R,
    ) -> Result<Vec<u8>, SecAggError> {
        if self.stage != Stage::Advertised {
            return Err(SecAggError::Refused("a second roster in one round".into()));
        }
        for n in &roster.neighbours {
            if n.id == self.id {
                return Err(SecAggError::Refused(
                    "the roster lists this client as its own neighbour".into(),
                ));
            }
            let peer = Peer {
                cipher_pk: parse_key("cipher_pk", &n.cipher_pk)?,
                mask_pk: parse_key("mask_pk", &n.mask_pk)?,
            };
            self.peers.insert(n.id.clone(), peer);
        }
        let names: Vec<String> = self.peers.keys().cloned().collect();
        let holders = graph::holders(&self.id, &names);
        if holders.len() < self.threshold {
            return Err(SecAggError::BelowThreshold {
                what: "holders of this client's secrets".into(),
                got: holders.len(),
                needed: self.threshold,
            });
        }
        if let Some(l) = self.light.as_mut() {
            // LightSecAgg: one coded share of the mask for every client (itself included), at
            // its position among them.
            let mask = light::mask_of(&self.self_seed, l.len);
            let shares = light::encode(&mask, holders.len(), l.params, rng)?;
            let mut sealed = Vec::with_capacity(holders.len());
            for (holder, share) in holders.iter().zip(shares) {
                if *holder == self.id {
                    l.held.insert(self.id.clone(), share);
                    continue;
                }
                let peer = &self.peers[*holder];
                let ct = light::seal(
                    &self.cipher,
                    &peer.cipher_pk,
                    &self.context,
                    &self.id,
                    holder,
                    &share,
                )?;
                sealed.push(((*holder).to_string(), ct));
            }
            self.weight = (roster.weight, roster.weight_total);
            self.stage = Stage::Shared;
            return Ok(light::encode_bundle(&self.context, &self.id, &sealed));
        }
        let self_shares = shamir::split(&self.self_seed, self.threshold, holders.len(), rng)?;
        let key_shares = shamir::split(self.mask.secret(), self.threshold, holders.len(), rng)?;
        let mut sealed = Vec::with_capacity(holders.len());
        for ((holder, s), k) in holders.iter().zip(self_shares).zip(key_shares) {
            if *holder == self.id {
                self.held.insert(
                    self.id.clone(),
                    Held {
                        self_mask: s,
                        mask_key: k,
                    },
                );
                continue;
            }
            let peer = &self.peers[*holder];
            let ct = bundle::encrypt(
                &self.cipher,
                &peer.cipher_pk,
                &self.context,
                &self.id,
                holder,
                &s,
                &k,
            )?;
            sealed.push(((*holder).to_string(), ct));
        }
        self.weight = (roster.weight, roster.weight_total);
        self.stage = Stage::Shared;
        Ok(bundle::encode(&self.context, &self.id, &sealed))
    }

    /// Stage 2: the neighbours that shared, and this client's inbox (the bytes of the blob
    /// `collect` names, fetched by the driver): its share from each of them, decrypted and
    /// kept. The masked input will carry pairwise masks with exactly these neighbours.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] out of order or for a neighbour not on the roster;
    /// [`SecAggError::Invalid`] for an inbox that does not hold exactly one share from each of
    /// them that decrypts.
    pub fn on_collect(&mut self, collect: &SaCollect, inbox: &[u8]) -> Result<(), SecAggError> {
        if self.stage != Stage::Shared {
            return Err(SecAggError::Refused(
                "a collect message before this client shared, or a second one".into(),
            ));
        }
        let mut owners = Vec::with_capacity(collect.sharing.len());
        for id in &collect.sharing {
            let Some(peer) = self.peers.get(id) else {
                return Err(SecAggError::Refused(format!(
                    "{id} shared but is not this client's neighbour"
                )));
            };
            owners.push((id.as_str(), peer.cipher_pk));
        }
        if let Some(l) = self.light.as_mut() {
            let ell = l.params.share_len(l.len);
            let shares =
                light::open_inbox(inbox, &self.cipher, &owners, &self.context, &self.id, ell)?;
            for (id, share) in collect.sharing.iter().zip(shares) {
                l.held.insert(id.clone(), share);
                self.sharing.insert(id.clone());
            }
            self.stage = Stage::Collected;
            return Ok(());
        }
        let shares = bundle::open_inbox(inbox, &self.cipher, &owners, &self.context, &self.id)?;
        for (id, (s, k)) in collect.sharing.iter().zip(shares) {
            self.held.insert(
                id.clone(),
                Held {
                    self_mask: s,
                    mask_key: k,
                },
            );
            self.sharing.insert(id.clone());
        }
        self.stage = Stage::Collected;
        Ok(())
    }

    /// Stage 2: the masked input of the update `trained − global`, scaled by this client's
    /// weight share, clipped, quantized, with its self-mask and its pairwise masks added.
    /// Flattened in the global model's tensor order.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] before the neighbours' shares arrived;
    /// [`SecAggError::Invalid`] when the two models differ in layout.
    pub fn masked_input(
        &mut self,
        global: &ParamSet,
        trained: &ParamSet,
    ) -> Result<Vec<u32>, SecAggError> {
        if self.stage != Stage::Collected {
            return Err(SecAggError::Refused(
                "masking before the neighbours' shares arrived".into(),
            ));
        }
        global
            .check_same_layout(trained)
            .map_err(|e| SecAggError::Invalid(format!("trained model: {e}")))?;
        let scale = self.weight.0 as f64 / self.weight.1 as f64;
        let mut out = Vec::with_capacity(global.num_params());
        for (g, t) in global.iter().zip(trained.iter()) {
            out.extend(
                g.data()
                    .iter()
                    .zip(t.data())
                    .map(|(g, t)| self.quantizer.quantize(((t - g) as f64 * scale) as f32)),
            );
        }
        if let Some(l) = &self.light {
            if out.len() != l.len {
                return Err(SecAggError::Invalid(format!(
                    "the model has {} values, the round's masks {}",
                    out.len(),
                    l.len
                )));
            }
            let mask = light::mask_of(&self.self_seed, l.len);
            for (x, z) in out.iter_mut().zip(mask) {
                *x = light::add(*x, z);
            }
            self.stage = Stage::Masked;
            return Ok(out);
        }
        mask::apply(&self.self_seed, Sign::Add, &mut out);
        let ctx = super::mask_context(&self.context);
        for peer_id in &self.sharing {
            let seed = self
                .mask
                .pairwise_seed(&self.peers[peer_id].mask_pk, ctx.as_bytes())
                .map_err(|e| SecAggError::Invalid(format!("{peer_id}'s mask key: {e}")))?;
            mask::apply(&seed, super::pair_sign(&self.id, peer_id), &mut out);
        }
        self.stage = Stage::Masked;
        Ok(out)
    }

    /// Stage 3: the shares the server asks for: self-mask shares of the survivors (this
    /// client among them), mask-key shares of the dropped. Never both for one neighbour, in one
    /// request or across requests: the server would then hold what unmasks that neighbour's
    /// individual update.
    ///
    /// # Errors
    /// [`SecAggError::Refused`] before this client sent its masked input, for a client named in
    /// both lists or in a list other than an earlier request's, for this client listed as
    /// dropped, or for a client that is not a neighbour that shared.
    pub fn on_unmask(&mut self, req: &SaUnmask) -> Result<Reveal, SecAggError> {
        if self.stage != Stage::Masked {
            return Err(SecAggError::Refused(
                "an unmask request before this client sent its masked input".into(),
            ));
        }
        if self.light.is_some() {
            return self.light_unmask(req).map(Reveal::MaskShare);
        }
        let survivors: BTreeSet<&String> = req.survivors.iter().collect();
        for d in &req.dropped {
            if survivors.contains(d) {
                return Err(SecAggError::Refused(format!(
                    "{d} is listed both as a survivor and as dropped: revealing both of its \
                     shares would unmask its update"
                )));
            }
            if *d == self.id {
                return Err(SecAggError::Refused(
                    "this client is listed as dropped, yet it sent its masked input".into(),
                ));
            }
            if self.revealed_self.contains(d) {
                return Err(SecAggError::Refused(format!(
                    "{d}'s self-mask share was revealed already; its mask-key share is refused"
                )));
            }
        }
        for s in &req.survivors {
            if self.revealed_keys.contains(s) {
                return Err(SecAggError::Refused(format!(
                    "{s}'s mask-key share was revealed already; its self-mask share is refused"
                )));
            }
        }
        for who in req.survivors.iter().chain(&req.dropped) {
            if *who != self.id && !self.sharing.contains(who) {
                return Err(SecAggError::Refused(format!(
                    "{who} is not a neighbour that shared with this client"
                )));
            }
        }
        let reveal = |who: &String, key: bool| {
            let h = &self.held[who];
            RevealedShare {
                of: who.clone(),
                share: hex::encode(if key { &h.mask_key } else { &h.self_mask }.to_bytes()),
            }
        };
        let mut self_masks: Vec<RevealedShare> = req
            .survivors
            .iter()
            .filter(|s| **s != self.id)
            .map(|s| reveal(s, false))
            .collect();
        self_masks.push(reveal(&self.id, false));
        self_masks.sort_by(|a, b| a.of.cmp(&b.of));
        let mask_keys: Vec<RevealedShare> = req.dropped.iter().map(|d| reveal(d, true)).collect();
        self.revealed_self
            .extend(self_masks.iter().map(|s| s.of.clone()));
        self.revealed_keys.extend(req.dropped.iter().cloned());
        Ok(Reveal::Shares(SaReveal {
            self_masks,
            mask_keys,
            mask_share: None,
        }))
    }

    /// LightSecAgg's stage 3: the sum of the coded shares held from the survivors, once. The
    /// survivors must include this client and number at least `U`: the sum over fewer could
    /// single out one client's mask, and a second request (a second set) could too.
    fn light_unmask(&mut self, req: &SaUnmask) -> Result<Vec<u32>, SecAggError> {
        let Some(l) = self.light.as_mut() else {
            return Err(SecAggError::Refused("not a LightSecAgg round".into()));
        };
        if l.answered {
            return Err(SecAggError::Refused(
                "a second unmask request: one aggregate share per round".into(),
            ));
        }
        if !req.dropped.is_empty() {
            return Err(SecAggError::Refused(
                "a LightSecAgg unmask request names survivors only".into(),
            ));
        }
        if !req.survivors.contains(&self.id) {
            return Err(SecAggError::Refused(
                "this client is not listed as a survivor, yet it sent its masked input".into(),
            ));
        }
        if req.survivors.len() < l.params.active {
            return Err(SecAggError::Refused(format!(
                "{} survivors, fewer than U = {}: their summed mask shares could single out one \
                 client's mask",
                req.survivors.len(),
                l.params.active
            )));
        }
        let ell = l.params.share_len(l.len);
        let mut sum = vec![0u32; ell];
        for s in &req.survivors {
            let Some(share) = l.held.get(s) else {
                return Err(SecAggError::Refused(format!(
                    "{s} is not a client that shared with this one"
                )));
            };
            for (a, v) in sum.iter_mut().zip(share) {
                *a = light::add(*a, *v);
            }
        }
        l.answered = true;
        Ok(sum)
    }
}
