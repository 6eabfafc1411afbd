//! Pseudo-random masks: a 32-byte seed expanded into `u32` words, added to (or removed from) a
//! quantized update with wrapping arithmetic, so that masks cancel in a sum mod `2^32`.
//!
//! The expansion is the ChaCha20 keystream (RFC 8439) under the seed as key, with an all-zero
//! nonce and the block counter starting at 0, read as little-endian `u32` words in order. Any
//! ChaCha20 implementation reproduces it (the 96-bit-nonce variant's 32-bit counter covers the
//! first 2^32 blocks, 2^36 words, far beyond any model); the first words for the all-zero seed are
//! RFC 8439's test vector (appendix A.1, test vector #1), checked below.

use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

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

/// Applies the mask of `seed` to `data`: word `i` of the keystream to `data[i]`.
pub fn apply(seed: &Seed, sign: Sign, data: &mut [u32]) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u32; 64];
    for chunk in data.chunks_mut(block.len()) {
        let words = &mut block[..chunk.len()];
        for w in words.iter_mut() {
            *w = rng.next_u32();
        }
        match sign {
            Sign::Add => chunk
                .iter_mut()
                .zip(words.iter())
                .for_each(|(x, m)| *x = x.wrapping_add(*m)),
            Sign::Sub => chunk
                .iter_mut()
                .zip(words.iter())
                .for_each(|(x, m)| *x = x.wrapping_sub(*m)),
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
    fn the_keystream_is_rfc_8439s() {
        // RFC 8439, A.1, test vector #1: key 0, nonce 0, block counter 0; keystream bytes
        // 76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28 ...
        let words = expand(&[0u8; 32], 4);
        assert_eq!(words, [0xade0_b876, 0x903d_f1a0, 0xe56a_5d40, 0x28bd_8653]);
        // The second block (counter 1) follows on from word 16: RFC 8439 A.1 test vector #2
        // uses key 0 and counter 1: 9f 07 e7 be 55 51 38 7a ...
        let words = expand(&[0u8; 32], 18);
        assert_eq!(words[16..], [0xbee7_079f, 0x7a38_5155]);
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
        // Chunking does not change the stream: a prefix is a prefix.
        assert_eq!(expand(&a, 1000)[..70], expand(&a, 70)[..]);
    }
}
