//! Mosquitto's password file (`password_file`, as `mosquitto_passwd` writes it) and the
//! constant-time comparisons of secrets.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;

#[derive(Clone, PartialEq, Eq)]
enum Hash {
    /// `$6$<salt>$<hash>`: SHA-512(password ‖ salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// A Mosquitto password file (`mosquitto_passwd`): `user:$7$<iterations>$<salt>$<hash>`
/// (PBKDF2-HMAC-SHA512, base64 salt and hash; Mosquitto 2.0's default) or `user:$6$<salt>$<hash>`
/// (SHA-512 of password then salt; Mosquitto 1.x).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PasswordFile {
    entries: HashMap<String, Hash>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&String> = self.entries.keys().collect();
        users.sort();
        f.debug_struct("PasswordFile")
            .field("users", &users)
            .finish_non_exhaustive()
    }
}

/// A `$7$` entry that no password matches: unknown users cost as much as known ones.
static DUMMY_SALT: [u8; 12] = [0x5a; 12];

impl PasswordFile {
    /// Reads and parses a password file.
    ///
    /// # Errors
    /// The I/O error or the first bad line (the line's user name, never its hash).
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a password file. Blank lines and lines starting with `#` are skipped.
    ///
    /// # Errors
    /// `line N: reason`; unsupported formats (plain-text passwords, Mosquitto 2.1's argon2id)
    /// are named.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut entries = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected `user:hash`", n + 1));
            };
            let bad = |why: &str| format!("line {} (user {user:?}): {why}", n + 1);
            let fields: Vec<&str> = hash.split('$').collect();
            let b64 = |s: &str| base64_decode(s).ok_or_else(|| bad("bad base64"));
            let parsed =
                match fields.as_slice() {
                    ["", "6", salt, h] => Hash::Sha512 {
                        salt: b64(salt)?,
                        hash: b64(h)?,
                    },
                    ["", "7", iterations, salt, h] => Hash::Pbkdf2 {
                        iterations: iterations
                            .parse::<NonZeroU32>()
                            .map_err(|_| bad("bad iteration count"))?,
                        salt: b64(salt)?,
                        hash: b64(h)?,
                    },
                    _ => return Err(bad(
                        "unsupported hash (expected $6$ or $7$ as written by mosquitto_passwd; \
                         plain-text passwords must be hashed with mosquitto_passwd -U)",
                    )),
                };
            if matches!(&parsed, Hash::Sha512 { hash, .. } | Hash::Pbkdf2 { hash, .. } if hash.is_empty())
            {
                return Err(bad("empty hash"));
            }
            if entries.insert(user.to_string(), parsed).is_some() {
                return Err(bad("user listed twice"));
            }
        }
        Ok(Self { entries })
    }

    /// Whether the file lists `user`.
    pub(crate) fn contains(&self, user: &str) -> bool {
        self.entries.contains_key(user)
    }

    /// Whether `password` is `user`'s. Constant time in the password; an unknown user costs a
    /// default PBKDF2 too. CPU-bound (PBKDF2 iterations): call from a blocking context.
    pub(crate) fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.entries.get(user) {
            Some(Hash::Sha512 { salt, hash }) => {
                use sha2::Digest;
                let mut h = sha2::Sha512::new();
                h.update(password);
                h.update(salt);
                ct_eq(&h.finalize(), hash)
            }
            Some(Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            }) => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            None => {
                let mut out = [0u8; 64];
                ring::pbkdf2::derive(
                    ring::pbkdf2::PBKDF2_HMAC_SHA512,
                    NonZeroU32::new(101).unwrap_or(NonZeroU32::MIN),
                    &DUMMY_SALT,
                    password,
                    &mut out,
                );
                false
            }
        }
    }
}

/// Equality in time independent of where the inputs differ (lengths are not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Equality of two secrets of possibly different lengths, in time independent of both.
pub(super) fn ct_eq_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    ct_eq(&sha2::Sha256::digest(a), &sha2::Sha256::digest(b))
}

/// Standard base64 (RFC 4648, `+/`, `=` padding optional); `None` for anything else.
pub(super) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot end a valid encoding.
    (bits < 6).then_some(out)
}
