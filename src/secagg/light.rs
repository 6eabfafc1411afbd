//! LightSecAgg (So et al., MLSys 2022): one-shot reconstruction of the survivors' aggregate
//! mask from coded mask shares, instead of SecAgg+'s per-client seed reconstruction.
//!
//! Each client draws a random mask `z` over `GF(q)`, `q = 2^32 − 5`, masks its quantized update
//! with it (`x + z mod q`) and, before that, sends every client of the round one coded share of
//! `z`: `z` is cut into `U − T` pieces of `ℓ = ⌈P/(U − T)⌉` values (the last padded with zeros),
//! `T` pieces of uniform noise are added, and the `U` pieces are the values at `x = N + 1, …,
//! N + U` of a polynomial of degree `U − 1` (per coordinate); holder `j` (1-based position among
//! the round's clients sorted by id) gets its value at `x = j`. Any `T` shares are uniform and
//! independent of `z` (the noise pieces hide it); any `U` evaluations of a sum of such
//! polynomials determine it. So once the masked inputs are in, each surviving client sends the
//! sum of the shares it holds from the survivors, and from any `U` of these sums the server
//! interpolates the sum of the survivors' masks, and only that.
//!
//! - `U` (`lsa_args.targeted_number_active_clients`): clients that must survive to the end. The
//!   default tolerates 30% dropouts: `N − ⌊3N/10⌋`.
//! - `T` (`lsa_args.privacy_guarantee`): colluding clients (together with the server) that learn
//!   nothing of one client's mask; `T < U`. The default, as FedML's, is `⌊N/2⌋`.
//!
//! Wire forms (the bundle, the inbox, the aggregate share) are safetensors; see
//! `docs/PROTOCOL.md`, "LightSecAgg".

use super::agree::KeyPair;
use super::bundle::{self, Entries};
use super::mask::{Aes256Ctr, Seed};
use super::SecAggError;
use ctr::cipher::{KeyIvInit, StreamCipher};
use rand::{CryptoRng, Rng};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;

/// The field's modulus, `2^32 − 5` (the largest prime below `2^32`: values fit a `u32`).
pub const Q: u64 = 4_294_967_291;

/// Name of the one tensor of an aggregate-share blob.
pub const AGGREGATE_TENSOR: &str = "secagg/mask_share";

/// Format tag in the metadata of LightSecAgg bundles and inboxes.
const FORMAT_BUNDLE: &str = "fedmq-lightsecagg-bundle";
const FORMAT_INBOX: &str = "fedmq-lightsecagg-inbox";

/// `U` and `T` of a round (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LightParams {
    /// Clients whose aggregate shares the server needs (`U`): the fewest that must survive.
    pub active: usize,
    /// Colluding clients that learn nothing of one client's mask (`T < U`).
    pub privacy: usize,
}

impl LightParams {
    /// The defaults for `n` clients: `U = n − ⌊3n/10⌋`, `T = ⌊n/2⌋` (below `U`).
    pub fn for_clients(n: usize) -> Self {
        Self::with_overrides(n, 0, None).0
    }

    /// `for_clients(n)` with FedML's overrides (`0` / `None` keep the default), made valid:
    /// `U ≤ n`, and `T < U` (when `T` is too large, `U` grows to `T + 1`, and where that passes
    /// `n`, `T` shrinks to `n − 1`). The second value says whether an override was changed.
    pub fn with_overrides(n: usize, active: usize, privacy: Option<usize>) -> (Self, bool) {
        let n = n.max(1);
        let mut changed = active > n;
        let mut active = match active {
            0 => n - (3 * n) / 10,
            a => a.min(n),
        };
        let mut t = privacy.unwrap_or(n / 2);
        if t >= active {
            changed |= privacy.is_some() || t >= n;
            if t < n {
                active = t + 1;
            } else {
                t = n - 1;
                active = n;
            }
        }
        if privacy.is_none() && active <= t {
            t = active - 1;
        }
        (Self { active, privacy: t }, changed)
    }

    /// Pieces of the mask in one share (`U − T`).
    pub fn pieces(&self) -> usize {
        self.active - self.privacy
    }

    /// Values in one coded share of a mask of `len` values: `⌈len/(U − T)⌉`.
    pub fn share_len(&self, len: usize) -> usize {
        len.div_ceil(self.pieces())
    }
}

/// The most bits per quantized value for which `n` values sum below `q` (no wrap mod `q`).
pub fn max_bits(n: u64) -> u32 {
    (1..=31u32)
        .rev()
        .find(|b| u128::from(n.max(1)) * ((1u128 << b) - 1) < u128::from(Q))
        .unwrap_or(0)
}

fn reduce(v: u64) -> u32 {
    (v % Q) as u32
}

/// `a + b mod q` (both reduced).
pub fn add(a: u32, b: u32) -> u32 {
    let s = u64::from(a) + u64::from(b);
    (if s >= Q { s - Q } else { s }) as u32
}

/// `a − b mod q` (both reduced).
pub fn sub(a: u32, b: u32) -> u32 {
    if a >= b {
        a - b
    } else {
        (u64::from(a) + Q - u64::from(b)) as u32
    }
}

fn mul(a: u32, b: u32) -> u32 {
    reduce(u64::from(a) * u64::from(b))
}

fn pow(mut base: u32, mut e: u64) -> u32 {
    let mut acc = 1u32;
    while e > 0 {
        if e & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    acc
}

fn inverse(a: u32) -> u32 {
    pow(a, Q - 2)
}

/// The coefficients `c_j` with `f(at) = Σ c_j·f(xs_j)` for every polynomial `f` of degree
/// below `xs.len()` (Lagrange; the points are distinct and reduced).
pub fn lagrange(xs: &[u32], at: u32) -> Vec<u32> {
    xs.iter()
        .enumerate()
        .map(|(j, &xj)| {
            let (mut num, mut den) = (1u32, 1u32);
            for (l, &xl) in xs.iter().enumerate() {
                if l != j {
                    num = mul(num, sub(at, xl));
                    den = mul(den, sub(xj, xl));
                }
            }
            mul(num, inverse(den))
        })
        .collect()
}

/// `v` folded below `2^35` and congruent mod `q` (`2^32 ≡ 5`): a product of two field values
/// folds to one term of a lazy sum.
#[inline]
fn fold(v: u64) -> u64 {
    (v >> 32) * 5 + (v & 0xffff_ffff)
}

/// `Σ_k c_k·v_k` coordinate-wise, mod `q`: products folded and summed lazily in `u64` (fewer
/// than `2^29` terms never overflow), reduced once at the end.
fn combine(c: &[u32], vs: &[&[u32]], len: usize) -> Vec<u32> {
    let mut acc = vec![0u64; len];
    for (&ck, v) in c.iter().zip(vs) {
        let ck = u64::from(ck);
        for (a, &x) in acc.iter_mut().zip(v.iter()) {
            *a += fold(ck * u64::from(x));
        }
    }
    acc.into_iter().map(reduce).collect()
}

/// The first `len` values of the mask of `seed`: the AES-256-CTR keystream of
/// [`super::mask`] read as little-endian `u32` words, words `≥ q` skipped.
pub fn mask_of(seed: &Seed, len: usize) -> Vec<u32> {
    let mut stream = Aes256Ctr::new(seed.into(), &[0u8; 16].into());
    let mut out = Vec::with_capacity(len);
    let mut block = vec![0u8; 16 << 10];
    while out.len() < len {
        block.fill(0);
        stream.apply_keystream(&mut block);
        for w in block.chunks_exact(4) {
            let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            if u64::from(w) < Q {
                out.push(w);
                if out.len() == len {
                    break;
                }
            }
        }
    }
    out
}

/// The `n` coded shares of `mask` with the given `T` noise pieces (each of
/// [`LightParams::share_len`] values, reduced): share `j − 1` is for the holder at `x = j`.
///
/// # Errors
/// [`SecAggError::Invalid`] for noise of the wrong shape, or `n < U`.
pub fn encode_with_noise(
    mask: &[u32],
    noise: &[Vec<u32>],
    n: usize,
    params: LightParams,
) -> Result<Vec<Vec<u32>>, SecAggError> {
    let ell = params.share_len(mask.len());
    if noise.len() != params.privacy || noise.iter().any(|p| p.len() != ell) {
        return Err(SecAggError::Invalid(format!(
            "LightSecAgg encoding needs {} noise pieces of {ell} values",
            params.privacy
        )));
    }
    if n < params.active {
        return Err(SecAggError::BelowThreshold {
            what: "holders of coded mask shares".into(),
            got: n,
            needed: params.active,
        });
    }
    let mut pieces: Vec<&[u32]> = mask.chunks(ell).collect();
    let padded: Vec<u32>;
    if let Some(last) = pieces.last().filter(|p| p.len() < ell) {
        let mut p = last.to_vec();
        p.resize(ell, 0);
        padded = p;
        pieces.pop();
        pieces.push(&padded);
    }
    let empty = vec![0u32; ell];
    while pieces.len() < params.pieces() {
        pieces.push(&empty);
    }
    pieces.extend(noise.iter().map(Vec::as_slice));
    let points = piece_points(n, params);
    Ok((1..=n as u32)
        .map(|j| combine(&lagrange(&points, j), &pieces, ell))
        .collect())
}

/// The `x` of the `U` pieces: `n + 1, …, n + U`.
fn piece_points(n: usize, params: LightParams) -> Vec<u32> {
    (1..=params.active).map(|k| (n + k) as u32).collect()
}

/// [`encode_with_noise`] with fresh uniform noise from `rng`.
///
/// # Errors
/// As [`encode_with_noise`].
pub fn encode<R: Rng + CryptoRng>(
    mask: &[u32],
    n: usize,
    params: LightParams,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>, SecAggError> {
    let ell = params.share_len(mask.len());
    let noise: Vec<Vec<u32>> = (0..params.privacy)
        .map(|_| {
            let mut piece = vec![0u32; ell];
            rng.fill(&mut piece[..]);
            // Uniform over the field: redraw the rare words at or above q.
            for w in &mut piece {
                while u64::from(*w) >= Q {
                    *w = rng.next_u32();
                }
            }
            piece
        })
        .collect();
    encode_with_noise(mask, &noise, n, params)
}

/// The sum of the masks whose coded shares were summed: from the summed shares `(x_j, s_j)` of
/// at least `U` holders (the first `U` are used), the first `len` values.
///
/// # Errors
/// [`SecAggError::BelowThreshold`] with fewer than `U` sums; [`SecAggError::Invalid`] for
/// repeated points or sums of the wrong length.
pub fn decode(
    sums: &[(u32, &[u32])],
    n: usize,
    params: LightParams,
    len: usize,
) -> Result<Vec<u32>, SecAggError> {
    let ell = params.share_len(len);
    if sums.len() < params.active {
        return Err(SecAggError::BelowThreshold {
            what: "aggregate mask shares".into(),
            got: sums.len(),
            needed: params.active,
        });
    }
    let used = &sums[..params.active];
    let xs: Vec<u32> = used.iter().map(|(x, _)| *x).collect();
    let mut sorted = xs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != xs.len() || used.iter().any(|(x, s)| s.len() != ell || *x == 0) {
        return Err(SecAggError::Invalid(
            "aggregate mask shares with repeated points or the wrong length".into(),
        ));
    }
    let mut out = Vec::with_capacity(params.pieces() * ell);
    for at in piece_points(n, params).iter().take(params.pieces()) {
        let ys: Vec<&[u32]> = used.iter().map(|(_, s)| *s).collect();
        out.extend(combine(&lagrange(&xs, *at), &ys, ell));
    }
    out.truncate(len);
    Ok(out)
}

/// Whether the spare summed share `(x, spare)` lies on the polynomial the first `U` sums
/// (`used`) determine.
pub fn consistent(used: &[(u32, &[u32])], x: u32, spare: &[u32]) -> bool {
    if used.iter().any(|(_, s)| s.len() != spare.len()) {
        return false;
    }
    let xs: Vec<u32> = used.iter().map(|(x, _)| *x).collect();
    let ys: Vec<&[u32]> = used.iter().map(|(_, s)| *s).collect();
    combine(&lagrange(&xs, x), &ys, spare.len()) == spare
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn bytes_to_field(bytes: &[u8]) -> Option<Vec<u32>> {
    bytes
        .chunks_exact(4)
        .map(|b| {
            let w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (u64::from(w) < Q).then_some(w)
        })
        .collect()
}

/// Bytes of one sealed share of `ell` values: the values and the AEAD tag.
pub fn ciphertext_len(ell: usize) -> usize {
    4 * ell + bundle::TAG_BYTES
}

/// `share` sealed for `holder` (the key and associated data of [`super::bundle`]).
pub(super) fn seal(
    own: &KeyPair,
    holder_public: &[u8; 32],
    context: &str,
    owner: &str,
    holder: &str,
    share: &[u32],
) -> Result<Vec<u8>, SecAggError> {
    bundle::seal_for(
        own,
        holder_public,
        context,
        owner,
        holder,
        words_to_bytes(share),
    )
}

fn serialize(
    format: &str,
    context: &str,
    party: (&str, &str),
    entries: &[(&str, &[u8])],
) -> Vec<u8> {
    let meta: HashMap<String, String> = [
        ("format", format),
        ("v", "1"),
        ("context", context),
        (party.0, party.1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let views: Vec<(&str, TensorView<'_>)> = entries
        .iter()
        .map(|(name, ct)| {
            let v = TensorView::new(Dtype::U8, vec![ct.len()], ct)
                .unwrap_or_else(|_| unreachable!("shape and length agree"));
            (*name, v)
        })
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap_or_default()
}

/// The entries of a LightSecAgg bundle or inbox, after its metadata was checked.
fn parse<'a>(
    bytes: &'a [u8],
    format: &str,
    context: &str,
    party: (&str, &str),
    ct_len: usize,
) -> Result<Vec<(String, &'a [u8])>, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let m = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| m.get(k).map(String::as_str);
    if get("format") != Some(format) || get("v") != Some("1") {
        return Err(format!("not a {format} of version 1"));
    }
    if get("context") != Some(context) || get(party.0) != Some(party.1) {
        return Err("made for another round or another client".into());
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(st.len());
    for (name, t) in st.tensors() {
        if t.dtype() != Dtype::U8 || t.shape().len() != 1 || t.data().len() != ct_len {
            return Err(format!("the entry {name:?} is not {ct_len} bytes"));
        }
        out.push((name, t.data()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The bundle's wire form: one `U8` tensor per holder (named by its id), the sealed share.
pub(super) fn encode_bundle(context: &str, owner: &str, sealed: &[(String, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<(&str, &[u8])> = sealed
        .iter()
        .map(|(to, ct)| (to.as_str(), ct.as_slice()))
        .collect();
    serialize(FORMAT_BUNDLE, context, ("from", owner), &entries)
}

/// The entries of `owner`'s LightSecAgg bundle, checked: one sealed share of `ell` values for
/// each holder in `holders`, nothing else.
///
/// # Errors
/// [`SecAggError::Invalid`] naming what is wrong.
pub fn check_bundle(
    bytes: &[u8],
    context: &str,
    owner: &str,
    holders: &[String],
    ell: usize,
) -> Result<Entries, SecAggError> {
    let bad = |why: String| SecAggError::Invalid(format!("{owner}'s share bundle: {why}"));
    let entries = parse(
        bytes,
        FORMAT_BUNDLE,
        context,
        ("from", owner),
        ciphertext_len(ell),
    )
    .map_err(bad)?;
    if !entries.iter().map(|(k, _)| k).eq(holders.iter()) {
        return Err(bad("its entries are not one per other client".into()));
    }
    Ok(entries.into_iter().map(|(k, v)| (k, v.to_vec())).collect())
}

/// The inbox of `holder`: the entry addressed to it from each owner in `from`.
pub fn encode_inbox(context: &str, holder: &str, from: &[(&str, &[u8])]) -> Vec<u8> {
    serialize(FORMAT_INBOX, context, ("to", holder), from)
}

/// `holder`'s coded shares from each owner in `owners` (with their cipher keys), read from its
/// inbox `bytes`, in the owners' order.
///
/// # Errors
/// [`SecAggError::Invalid`]: not an inbox of this round and holder, entries other than one per
/// owner, or an entry that does not open or holds values outside the field.
pub(super) fn open_inbox(
    bytes: &[u8],
    own: &KeyPair,
    owners: &[(&str, [u8; 32])],
    context: &str,
    holder: &str,
    ell: usize,
) -> Result<Vec<Vec<u32>>, SecAggError> {
    let bad = |why: String| SecAggError::Invalid(format!("the inbox: {why}"));
    let entries = parse(
        bytes,
        FORMAT_INBOX,
        context,
        ("to", holder),
        ciphertext_len(ell),
    )
    .map_err(bad)?;
    if entries.len() != owners.len() || !entries.iter().zip(owners).all(|(e, o)| e.0 == o.0) {
        return Err(bad(
            "its entries are not those of the clients that shared".into()
        ));
    }
    entries
        .iter()
        .zip(owners)
        .map(|((_, ct), (owner, public))| {
            let plain = bundle::open_for(own, public, context, owner, holder, ct.to_vec())
                .map_err(|_| {
                    bad(format!(
                        "{owner}'s share does not decrypt (altered, or sealed for another key)"
                    ))
                })?;
            bytes_to_field(&plain)
                .ok_or_else(|| bad(format!("{owner}'s share holds values outside the field")))
        })
        .collect()
}

/// An aggregate share as a blob: safetensors with one `U32` tensor [`AGGREGATE_TENSOR`].
pub fn encode_aggregate(values: &[u32]) -> Vec<u8> {
    let bytes = words_to_bytes(values);
    let view = TensorView::new(Dtype::U32, vec![values.len()], &bytes)
        .unwrap_or_else(|_| unreachable!("shape and length agree"));
    safetensors::serialize([(AGGREGATE_TENSOR, view)], None)
        .unwrap_or_else(|_| unreachable!("one well-formed tensor"))
}

/// The values of an aggregate-share blob of `ell` field values.
///
/// # Errors
/// [`SecAggError::Invalid`]: not such a blob.
pub fn decode_aggregate(blob: &[u8], ell: usize) -> Result<Vec<u32>, SecAggError> {
    let bad = |why: String| SecAggError::Invalid(format!("not an aggregate mask share: {why}"));
    let st = safetensors::SafeTensors::deserialize(blob).map_err(|e| bad(e.to_string()))?;
    if st.len() != 1 {
        return Err(bad(format!("{} tensors", st.len())));
    }
    let t = st
        .tensor(AGGREGATE_TENSOR)
        .map_err(|_| bad(format!("no tensor {AGGREGATE_TENSOR:?}")))?;
    if t.dtype() != Dtype::U32 || t.shape() != [ell] {
        return Err(bad(format!(
            "the tensor is not a U32 vector of {ell} values"
        )));
    }
    bytes_to_field(t.data()).ok_or_else(|| bad("values outside the field".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn parameters_follow_fedml_and_stay_valid() {
        assert_eq!(
            LightParams::for_clients(10),
            LightParams {
                active: 7,
                privacy: 5
            }
        );
        assert_eq!(LightParams::for_clients(100).pieces(), 20);
        assert_eq!(LightParams::for_clients(2).active, 2);
        assert_eq!(LightParams::for_clients(1).privacy, 0);
        // FedML's example: privacy_guarantee 2 with 2 clients per round.
        let (p, changed) = LightParams::with_overrides(2, 0, Some(2));
        assert_eq!((p.active, p.privacy, changed), (2, 1, true));
        let (p, changed) = LightParams::with_overrides(10, 6, Some(3));
        assert_eq!((p.active, p.privacy, changed), (6, 3, false));
        let (p, changed) = LightParams::with_overrides(10, 4, Some(6));
        assert_eq!((p.active, p.privacy, changed), (7, 6, true));
        for n in 1..40 {
            let p = LightParams::for_clients(n);
            assert!(p.privacy < p.active && p.active <= n, "{n}: {p:?}");
        }
    }

    #[test]
    fn headroom_keeps_sums_below_the_prime() {
        for n in [1u64, 2, 4, 5, 10, 100, 1000] {
            let b = max_bits(n);
            assert!(u128::from(n) * ((1u128 << b) - 1) < u128::from(Q), "{n}");
            assert!(
                u128::from(n) * ((1u128 << (b + 1)) - 1) >= u128::from(Q),
                "{n}"
            );
        }
        assert_eq!(max_bits(10), 28);
        assert_eq!(max_bits(4), 29, "4·(2^30 − 1) passes 2^32 − 5");
    }

    #[test]
    fn field_arithmetic_and_interpolation() {
        let q = Q as u32;
        assert_eq!(add(q - 1, 1), 0);
        assert_eq!(sub(0, 1), q - 1);
        assert_eq!(mul(inverse(12345), 12345), 1);
        // f(x) = 3 + 2x + x^2 through x = 1, 2, 3, evaluated at 10.
        let f = |x: u32| 3 + 2 * x + x * x;
        let c = lagrange(&[1, 2, 3], 10);
        let at10 = c
            .iter()
            .zip([f(1), f(2), f(3)])
            .fold(0, |s, (c, y)| add(s, mul(*c, y)));
        assert_eq!(at10, f(10));
    }

    #[test]
    fn masks_skip_words_outside_the_field() {
        let m = mask_of(&[7u8; 32], 10_000);
        assert!(m.iter().all(|&w| u64::from(w) < Q));
        assert_eq!(m[..100], mask_of(&[7u8; 32], 100)[..]);
        assert_ne!(m[..8], mask_of(&[8u8; 32], 8)[..]);
    }

    #[test]
    fn any_u_summed_shares_give_the_sum_of_the_masks() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (n, len) = (10, 1001);
        let params = LightParams::for_clients(n);
        let masks: Vec<Vec<u32>> = (0..n).map(|i| mask_of(&[i as u8; 32], len)).collect();
        let shares: Vec<Vec<Vec<u32>>> = masks
            .iter()
            .map(|m| encode(m, n, params, &mut rng).unwrap())
            .collect();
        // Survivors: 0..8 (client 8 and 9 dropped); responders: 7 of them, not in order.
        let survivors: Vec<usize> = (0..8).collect();
        let mut expected = vec![0u32; len];
        for s in &survivors {
            for (e, v) in expected.iter_mut().zip(&masks[*s]) {
                *e = add(*e, *v);
            }
        }
        let responders = [6usize, 0, 3, 7, 1, 5, 2];
        let sums: Vec<(u32, Vec<u32>)> = responders
            .iter()
            .map(|&j| {
                let mut acc = vec![0u32; params.share_len(len)];
                for s in &survivors {
                    for (a, v) in acc.iter_mut().zip(&shares[*s][j]) {
                        *a = add(*a, *v);
                    }
                }
                (j as u32 + 1, acc)
            })
            .collect();
        let views: Vec<(u32, &[u32])> = sums.iter().map(|(x, s)| (*x, s.as_slice())).collect();
        assert_eq!(decode(&views, n, params, len).unwrap(), expected);
        assert!(matches!(
            decode(&views[..6], n, params, len),
            Err(SecAggError::BelowThreshold {
                got: 6,
                needed: 7,
                ..
            })
        ));
    }

    #[test]
    fn t_shares_do_not_depend_on_the_mask() {
        // With the noise chosen to match, T holders' shares of two different masks are equal:
        // the shares alone cannot tell the masks apart. (T = 2, U = 3, one data piece.)
        let params = LightParams {
            active: 3,
            privacy: 2,
        };
        let n = 4;
        let a = encode_with_noise(&[5], &[vec![11], vec![13]], n, params).unwrap();
        // Holders 1 and 2 see (a[0], a[1]); find noise for mask 6 giving the same two values by
        // solving over all noise pairs in a small window is too slow in a prime this large, so
        // solve the 2×2 system: share_j = c_j0·z + c_j1·n1 + c_j2·n2.
        let pts = [5u32, 6, 7];
        let c1 = lagrange(&pts, 1);
        let c2 = lagrange(&pts, 2);
        // Target: c_j1·n1 + c_j2·n2 = a_j − c_j0·6.
        let r1 = sub(a[0][0], mul(c1[0], 6));
        let r2 = sub(a[1][0], mul(c2[0], 6));
        let det = sub(mul(c1[1], c2[2]), mul(c1[2], c2[1]));
        let inv = inverse(det);
        let n1 = mul(sub(mul(r1, c2[2]), mul(c1[2], r2)), inv);
        let n2 = mul(sub(mul(c1[1], r2), mul(r1, c2[1])), inv);
        let b = encode_with_noise(&[6], &[vec![n1], vec![n2]], n, params).unwrap();
        assert_eq!((a[0][0], a[1][0]), (b[0][0], b[1][0]));
        assert_ne!(a[2][0], b[2][0], "a third share does tell them apart");
    }

    #[test]
    fn blobs_round_trip_and_strangers_are_refused() {
        let v: Vec<u32> = (0..50).collect();
        assert_eq!(decode_aggregate(&encode_aggregate(&v), 50).unwrap(), v);
        assert!(decode_aggregate(&encode_aggregate(&v), 49).is_err());
        assert!(decode_aggregate(&encode_aggregate(&[u32::MAX]), 1).is_err());
        assert!(decode_aggregate(b"junk", 1).is_err());
        let ct = vec![7u8; ciphertext_len(3)];
        let sealed = vec![("b".to_string(), ct.clone()), ("c".to_string(), ct)];
        let blob = encode_bundle("run|1", "a", &sealed);
        let holders = vec!["b".to_string(), "c".to_string()];
        assert_eq!(
            check_bundle(&blob, "run|1", "a", &holders, 3)
                .unwrap()
                .len(),
            2
        );
        for (ctx, owner, hs, ell) in [
            ("run|2", "a", &holders[..], 3),
            ("run|1", "b", &holders[..], 3),
            ("run|1", "a", &holders[..1], 3),
            ("run|1", "a", &holders[..], 4),
        ] {
            assert!(check_bundle(&blob, ctx, owner, hs, ell).is_err());
        }
        assert!(check_bundle(b"{}", "run|1", "a", &holders, 3).is_err());
    }
}
