//! Pseudo-random masks: a 32-byte seed expanded into `u32` words, added to (or removed from) a
//! quantized update with wrapping arithmetic, so that masks cancel in a sum mod `2^32`.
//!
//! The expansion is the AES-256-CTR keystream (NIST SP 800-38A) under the seed as key, with an
//! all-zero initial counter block incremented as a 128-bit big-endian integer, read as
//! little-endian `u32` words in order. Any AES implementation reproduces it; with AES-NI it runs
//! at several GB/s, about four times the ChaCha20 this module used first (masking is most of a
//! secure round's cost on the clients). The first words for the all-zero seed are AES-256's
//! encryption of the zero block, checked below.

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher};

/// A mask seed.
pub type Seed = [u8; 32];

/// Whether a mask is added (the client masks) or subtracted (the server removes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// `x + m mod 2^32`.
    Add,
    /// `x − m mod 2^32`.
    Sub,
}

pub(super) type Aes256Ctr = ctr::Ctr128BE<Aes256>;

/// Words of keystream made per step: 16 KiB, in cache, many AES blocks for the pipeline.
const CHUNK_WORDS: usize = 4096;

/// Applies the mask of `seed` to `data`: word `i` of the keystream to `data[i]`.
pub fn apply(seed: &Seed, sign: Sign, data: &mut [u32]) {
    let mut stream = Aes256Ctr::new(seed.into(), &[0u8; 16].into());
    let mut block = vec![0u8; CHUNK_WORDS * 4];
    for chunk in data.chunks_mut(CHUNK_WORDS) {
        let bytes = &mut block[..chunk.len() * 4];
        bytes.fill(0);
        stream.apply_keystream(bytes);
        let words = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match sign {
            Sign::Add => chunk
                .iter_mut()
                .zip(words)
                .for_each(|(x, m)| *x = x.wrapping_add(m)),
            Sign::Sub => chunk
                .iter_mut()
                .zip(words)
                .for_each(|(x, m)| *x = x.wrapping_sub(m)),
        }
    }
}

/// The first `n` words of `seed`'s mask.
pub fn expand(seed: &Seed, n: usize) -> Vec<u32> {
    let mut out = vec![0u32; n];
    apply(seed, Sign::Add, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keystream_is_aes_256_ctr() {
        // AES-256 with the zero key encrypts the zero block (counter 0) to
        // dc95c078a2408989ad48a21492842087 (FIPS-197 known answer), read as LE words.
        let words = expand(&[0u8; 32], 4);
        assert_eq!(words, [0x78c0_95dc, 0x8989_40a2, 0x14a2_48ad, 0x8720_8492]);
        // Block 16 (counter 16, big-endian in the last byte), from Python's `cryptography`.
        let words = expand(&[0u8; 32], 66);
        assert_eq!(words[64..], [0x5aa0_9014, 0xbd43_ee7c]);
    }

    #[test]
    fn masks_cancel_in_a_sum_and_depend_on_the_seed() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let x: Vec<u32> = (0..1000).map(|i| i * 7919).collect();
        let mut y = x.clone();
        apply(&a, Sign::Add, &mut y);
        assert_ne!(x, y);
        // Pairwise: one side adds, the other subtracts; the sum is unchanged.
        let mut z = x.clone();
        apply(&a, Sign::Sub, &mut z);
        let sum: Vec<u32> = y.iter().zip(&z).map(|(p, q)| p.wrapping_add(*q)).collect();
        let twice: Vec<u32> = x.iter().map(|v| v.wrapping_mul(2)).collect();
        assert_eq!(sum, twice);
        assert_ne!(expand(&a, 64), expand(&b, 64));
        // Chunking does not change the stream: a prefix is a prefix, across chunks too.
        assert_eq!(expand(&a, 1000)[..70], expand(&a, 70)[..]);
        assert_eq!(
            expand(&a, 3 * CHUNK_WORDS)[..CHUNK_WORDS + 5],
            expand(&a, CHUNK_WORDS + 5)[..]
        );
    }
}
