//! The share bundle: the blob in which a client leaves, for each neighbour, its shares of its
//! self-mask seed and of its mask key, encrypted so that only that neighbour can read them; and
//! the inbox, the blob in which the server gathers for one client the entries addressed to it.
//!
//! Wire form of a bundle (JSON):
//! `{"v": 1, "context": "<run>|<round>", "from": "<owner>", "shares": [{"to": "<holder>",
//! "ct": "<hex>"}, …]}` with one entry per neighbour, sorted by `to`. An inbox:
//! `{"v": 1, "context": "<run>|<round>", "to": "<holder>", "shares": [{"from": "<owner>",
//! "ct": "<hex>"}, …]}`, one entry per neighbour that shared, sorted by `from`, each `ct` copied
//! from the owner's bundle. The server can read neither.
//!
//! `ct` is AES-256-GCM (96-bit all-zero nonce: each key seals one message) of the self-mask share
//! followed by the mask-key share (66 + 66 bytes, `shamir` wire form), with the 16-byte tag
//! appended. Its key is the X25519 agreement of the owner's and the holder's cipher keys, through
//! HKDF ([`KeyPair::pairwise_seed`]) with the context `share|<run>|<round>|<owner>|<holder>`; the
//! same string is the AEAD's associated data. A share sealed for one holder, round or owner does
//! not open for another.

use super::agree::KeyPair;
use super::shamir::{Share, SHARE_BYTES};
use super::SecAggError;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

/// The bundle format version.
pub const BUNDLE_VERSION: u32 = 1;

/// Largest bundle accepted, in bytes (4096 neighbours with room to spare).
pub const MAX_BUNDLE_BYTES: usize = 2 << 20;

/// Bytes of the AEAD tag appended to each ciphertext.
pub const TAG_BYTES: usize = 16;

/// Bytes of one entry's ciphertext: two shares and the tag.
pub const CIPHERTEXT_BYTES: usize = 2 * SHARE_BYTES + TAG_BYTES;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bundle {
    v: u32,
    context: String,
    from: String,
    shares: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    to: String,
    ct: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inbox {
    v: u32,
    context: String,
    to: String,
    shares: Vec<InboxEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxEntry {
    from: String,
    ct: String,
}

/// A bundle's entries as the server checked them: holder → ciphertext.
pub type Entries = std::collections::BTreeMap<String, Vec<u8>>;

fn share_context(context: &str, from: &str, to: &str) -> String {
    format!("share|{context}|{from}|{to}")
}

fn key(own: &KeyPair, peer_public: &[u8; 32], context: &str) -> Result<LessSafeKey, SecAggError> {
    let k = own
        .pairwise_seed(peer_public, context.as_bytes())
        .map_err(|e| SecAggError::Invalid(format!("cipher key: {e}")))?;
    let unbound = UnboundKey::new(&aead::AES_256_GCM, &k)
        .map_err(|_| SecAggError::Invalid("AES-256-GCM key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

/// `plain` sealed by `owner` for `holder` (AES-256-GCM under their agreed key; see the module
/// docs).
pub(super) fn seal_for(
    own: &KeyPair,
    holder_public: &[u8; 32],
    context: &str,
    owner: &str,
    holder: &str,
    mut plain: Vec<u8>,
) -> Result<Vec<u8>, SecAggError> {
    let ad = share_context(context, owner, holder);
    let sealing = key(own, holder_public, &ad)?;
    sealing
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(ad.as_bytes()),
            &mut plain,
        )
        .map_err(|_| SecAggError::Invalid("sealing a share".into()))?;
    Ok(plain)
}

/// The plaintext of `ct`, sealed by `owner` for `holder` (this client).
///
/// # Errors
/// [`SecAggError::Invalid`] when it does not open.
pub(super) fn open_for(
    own: &KeyPair,
    owner_public: &[u8; 32],
    context: &str,
    owner: &str,
    holder: &str,
    mut ct: Vec<u8>,
) -> Result<Vec<u8>, SecAggError> {
    let ad = share_context(context, owner, holder);
    let opening = key(own, owner_public, &ad)?;
    let len = opening
        .open_in_place(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(ad.as_bytes()),
            &mut ct,
        )
        .map_err(|_| SecAggError::Invalid(format!("{owner}'s share does not decrypt")))?
        .len();
    ct.truncate(len);
    Ok(ct)
}

/// The ciphertext of `owner`'s two shares for `holder`.
pub(super) fn encrypt(
    own: &KeyPair,
    holder_public: &[u8; 32],
    context: &str,
    owner: &str,
    holder: &str,
    self_mask: &Share,
    mask_key: &Share,
) -> Result<Vec<u8>, SecAggError> {
    let mut buf = Vec::with_capacity(CIPHERTEXT_BYTES);
    buf.extend_from_slice(&self_mask.to_bytes());
    buf.extend_from_slice(&mask_key.to_bytes());
    seal_for(own, holder_public, context, owner, holder, buf)
}

/// The bundle's wire form.
pub(super) fn encode(context: &str, owner: &str, sealed: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut shares: Vec<Entry> = sealed
        .iter()
        .map(|(to, ct)| Entry {
            to: to.clone(),
            ct: hex::encode(ct),
        })
        .collect();
    shares.sort_by(|a, b| a.to.cmp(&b.to));
    let b = Bundle {
        v: BUNDLE_VERSION,
        context: context.to_string(),
        from: owner.to_string(),
        shares,
    };
    serde_json::to_vec(&b).unwrap_or_default()
}

/// The entries of `owner`'s bundle `bytes`, checked against the holders it must address
/// (`holders`: the owner's neighbours): one well-formed ciphertext for each, nothing else.
///
/// # Errors
/// [`SecAggError::Invalid`] naming what is wrong.
pub fn check_bundle(
    bytes: &[u8],
    context: &str,
    owner: &str,
    holders: &[String],
) -> Result<Entries, SecAggError> {
    let bad = |why: &str| SecAggError::Invalid(format!("{owner}'s share bundle: {why}"));
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(bad("larger than a bundle can be"));
    }
    let b: Bundle =
        serde_json::from_slice(bytes).map_err(|e| bad(&format!("not a bundle ({e})")))?;
    if b.v != BUNDLE_VERSION {
        return Err(bad(&format!("unknown version {}", b.v)));
    }
    if b.context != context || b.from != owner {
        return Err(bad("made for another round or by another client"));
    }
    let mut entries = Entries::new();
    for e in b.shares {
        let ct = hex::decode(&e.ct).map_err(|_| bad("a ciphertext is not hex"))?;
        if ct.len() != CIPHERTEXT_BYTES {
            return Err(bad("a ciphertext has the wrong length"));
        }
        if entries.insert(e.to, ct).is_some() {
            return Err(bad("two entries for one holder"));
        }
    }
    if !entries.keys().eq(holders.iter()) {
        return Err(bad("its entries are not one per neighbour"));
    }
    Ok(entries)
}

/// The inbox of `holder`: the entry addressed to it from each owner in `from` (sorted).
pub fn encode_inbox(context: &str, holder: &str, from: &[(&str, &[u8])]) -> Vec<u8> {
    let inbox = Inbox {
        v: BUNDLE_VERSION,
        context: context.to_string(),
        to: holder.to_string(),
        shares: from
            .iter()
            .map(|(owner, ct)| InboxEntry {
                from: (*owner).to_string(),
                ct: hex::encode(ct),
            })
            .collect(),
    };
    serde_json::to_vec(&inbox).unwrap_or_default()
}

/// `holder`'s two shares from each owner in `owners` (with their cipher public keys), read from
/// its inbox `bytes`.
///
/// # Errors
/// [`SecAggError::Invalid`]: not an inbox, another round's or holder's, an owner missing or one
/// not asked for, or an entry that does not decrypt.
pub(super) fn open_inbox(
    bytes: &[u8],
    own: &KeyPair,
    owners: &[(&str, [u8; 32])],
    context: &str,
    holder: &str,
) -> Result<Vec<(Share, Share)>, SecAggError> {
    let bad = |why: String| SecAggError::Invalid(format!("the inbox: {why}"));
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(bad("larger than an inbox can be".into()));
    }
    let inbox: Inbox =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not an inbox ({e})")))?;
    if inbox.v != BUNDLE_VERSION {
        return Err(bad(format!("unknown version {}", inbox.v)));
    }
    if inbox.context != context || inbox.to != holder {
        return Err(bad("made for another round or another client".into()));
    }
    if inbox.shares.len() != owners.len()
        || !inbox
            .shares
            .iter()
            .zip(owners)
            .all(|(e, (o, _))| e.from == *o)
    {
        return Err(bad(
            "its entries are not those of the neighbours that shared".into(),
        ));
    }
    inbox
        .shares
        .iter()
        .zip(owners)
        .map(|(e, (owner, public))| {
            let buf =
                hex::decode(&e.ct).map_err(|_| bad(format!("{owner}'s ciphertext is not hex")))?;
            if buf.len() != CIPHERTEXT_BYTES {
                return Err(bad(format!("{owner}'s ciphertext has the wrong length")));
            }
            let plain = open_for(own, public, context, owner, holder, buf).map_err(|_| {
                bad(format!(
                    "{owner}'s share does not decrypt (altered, or sealed for another key)"
                ))
            })?;
            let s = Share::from_bytes(&plain[..SHARE_BYTES])?;
            let k = Share::from_bytes(&plain[SHARE_BYTES..2 * SHARE_BYTES])?;
            Ok((s, k))
        })
        .collect()
}
