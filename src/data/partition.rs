//! Federated partitions of a data set among clients, with FedML's method names and meanings.
//!
//! - `homo`: shuffle all samples and split them into near-equal parts (IID).
//! - `hetero`: FedML's label-skewed Dirichlet partition (Hsu et al. 2019, as in FedML's
//!   `non_iid_partition_with_dirichlet_distribution`). For each class, shuffle its samples, draw
//!   client proportions `~ Dir(alpha)`, zero the proportion of clients that already hold at least
//!   `N / num_clients` samples, renormalize, and cut the class by cumulative proportions. Repeat the
//!   whole draw until every client has at least `min_samples` samples (at most
//!   [`HETERO_MAX_ATTEMPTS`] times). Smaller `alpha` means more skew.
//! - `pathological`: McMahan et al. 2017: sort samples by label, cut them into
//!   `num_clients × shards_per_client` equal shards and give each client `shards_per_client` random
//!   shards, so each client sees few classes.
//!
//! A [`Partition`] is a list of sample indices per client (sorted), into the one shared data set.
//! Partitions are deterministic for a seed (ChaCha8).

use super::{Error, PartitionStats, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How many full Dirichlet draws `hetero` makes before giving up on `min_samples`.
pub const HETERO_MAX_ATTEMPTS: usize = 1000;

/// The valid method names, as listed in errors.
const VALID_METHODS: &str = "homo, hetero, pathological, natural";

/// How samples are spread among clients (FedML's `data_args.partition_method`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum PartitionMethod {
    /// IID: a random permutation cut into near-equal parts.
    Homo,
    /// Label skew: per-class Dirichlet proportions with concentration `alpha` (FedML's
    /// `partition_alpha`; smaller is more skewed).
    Hetero {
        /// Dirichlet concentration, `> 0`.
        alpha: f64,
    },
    /// McMahan et al.'s label shards: each client gets `shards_per_client` shards of label-sorted
    /// samples.
    Pathological {
        /// Shards per client, `>= 1` (McMahan et al. use 2).
        shards_per_client: usize,
    },
    /// One client per natural owner of the samples (a play's role, a user; LEAF's partition),
    /// for data sets that have owners ([`crate::data::Dataset::groups`]); see
    /// [`partition_natural`].
    Natural,
}

impl PartitionMethod {
    /// FedML's default `partition_alpha`.
    pub const DEFAULT_ALPHA: f64 = 0.5;
    /// McMahan et al.'s shards per client.
    pub const DEFAULT_SHARDS_PER_CLIENT: usize = 2;

    /// The method's name: `homo`, `hetero` or `pathological`.
    pub fn name(&self) -> &'static str {
        match self {
            PartitionMethod::Homo => "homo",
            PartitionMethod::Hetero { .. } => "hetero",
            PartitionMethod::Pathological { .. } => "pathological",
            PartitionMethod::Natural => "natural",
        }
    }

    /// Builds a method from FedML-style arguments: the name, `partition_alpha` (used by `hetero`) and
    /// shards per client (used by `pathological`).
    ///
    /// # Errors
    /// [`Error::UnknownPartition`] for an unknown name. Values are checked by [`partition`].
    pub fn from_args(name: &str, alpha: f64, shards_per_client: usize) -> Result<Self> {
        Ok(match name.parse::<PartitionMethod>()? {
            PartitionMethod::Homo => PartitionMethod::Homo,
            PartitionMethod::Hetero { .. } => PartitionMethod::Hetero { alpha },
            PartitionMethod::Pathological { .. } => {
                PartitionMethod::Pathological { shards_per_client }
            }
            PartitionMethod::Natural => PartitionMethod::Natural,
        })
    }
}

impl FromStr for PartitionMethod {
    type Err = Error;

    /// Parses `homo`, `hetero` (with [`PartitionMethod::DEFAULT_ALPHA`]) or `pathological` (with
    /// [`PartitionMethod::DEFAULT_SHARDS_PER_CLIENT`]), case-insensitively. Use
    /// [`PartitionMethod::from_args`] to supply `partition_alpha`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "homo" => Ok(PartitionMethod::Homo),
            "hetero" => Ok(PartitionMethod::Hetero {
                alpha: Self::DEFAULT_ALPHA,
            }),
            "pathological" => Ok(PartitionMethod::Pathological {
                shards_per_client: Self::DEFAULT_SHARDS_PER_CLIENT,
            }),
            "natural" | "leaf" | "by_owner" => Ok(PartitionMethod::Natural),
            _ => Err(Error::UnknownPartition {
                name: s.to_string(),
                valid: VALID_METHODS,
            }),
        }
    }
}

impl fmt::Display for PartitionMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionMethod::Homo => f.write_str("homo"),
            PartitionMethod::Hetero { alpha } => write!(f, "hetero (alpha {alpha})"),
            PartitionMethod::Pathological { shards_per_client } => {
                write!(f, "pathological ({shards_per_client} shards per client)")
            }
            PartitionMethod::Natural => f.write_str("natural (one client per owner)"),
        }
    }
}

/// Sample indices per client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// `clients[c]`: the sorted sample indices of client `c`.
    clients: Vec<Vec<usize>>,
    /// `groups[c]`: the natural owner client `c` stands for (the `natural` partition only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    groups: Option<Vec<u32>>,
}

impl Partition {
    /// Wraps per-client index lists (each is sorted).
    pub fn from_clients(mut clients: Vec<Vec<usize>>) -> Self {
        for c in &mut clients {
            c.sort_unstable();
        }
        Partition {
            clients,
            groups: None,
        }
    }

    /// The natural owner (group id) client `c` stands for, in a `natural` partition.
    pub fn group(&self, c: usize) -> Option<u32> {
        self.groups.as_ref().and_then(|g| g.get(c).copied())
    }

    /// Number of clients.
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// The sorted sample indices of client `c`, or `None` when there is no such client.
    pub fn client(&self, c: usize) -> Option<&[usize]> {
        self.clients.get(c).map(Vec::as_slice)
    }

    /// All clients' index lists.
    pub fn clients(&self) -> &[Vec<usize>] {
        &self.clients
    }

    /// Samples per client.
    pub fn sizes(&self) -> Vec<usize> {
        self.clients.iter().map(Vec::len).collect()
    }

    /// Total samples over all clients.
    pub fn total_samples(&self) -> usize {
        self.clients.iter().map(Vec::len).sum()
    }

    /// The index lists, by value.
    pub fn into_clients(self) -> Vec<Vec<usize>> {
        self.clients
    }

    /// Statistics of this partition over `labels` (see [`PartitionStats::compute`]).
    ///
    /// # Errors
    /// As [`PartitionStats::compute`].
    pub fn stats(&self, labels: &[u32], num_classes: usize) -> Result<PartitionStats> {
        PartitionStats::compute(self, labels, num_classes)
    }
}

/// Splits the samples with `labels` among `num_clients` clients.
///
/// Every sample goes to exactly one client; the result depends only on the arguments (same `seed`,
/// same partition). `min_samples` is the least each client must get: `hetero` redraws until it
/// holds, the other methods fail if it does not.
///
/// # Errors
/// Up front: [`Error::NoClients`], [`Error::InvalidLabel`], [`Error::InvalidAlpha`],
/// [`Error::NoShards`], [`Error::TooFewSamples`] (`num_clients × min_samples` or the shards exceed
/// the samples). Afterwards: [`Error::PartitionFailed`] when `hetero` cannot satisfy
/// `min_samples` in [`HETERO_MAX_ATTEMPTS`] draws, [`Error::ClientTooSmall`] otherwise.
pub fn partition(
    labels: &[u32],
    num_classes: usize,
    num_clients: usize,
    method: PartitionMethod,
    seed: u64,
    min_samples: usize,
) -> Result<Partition> {
    let n = labels.len();
    if num_clients == 0 {
        return Err(Error::NoClients);
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= num_classes)
    {
        return Err(Error::InvalidLabel {
            index,
            label,
            num_classes,
        });
    }
    if num_clients
        .checked_mul(min_samples)
        .is_none_or(|need| need > n)
    {
        return Err(Error::TooFewSamples {
            samples: n,
            num_clients,
            needed: min_samples,
            what: "samples (min_samples)",
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let clients = match method {
        PartitionMethod::Natural => return Err(Error::NoOwners),
        PartitionMethod::Homo => homo(n, num_clients, &mut rng),
        PartitionMethod::Hetero { alpha } => {
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(Error::InvalidAlpha { alpha });
            }
            hetero(
                labels,
                num_classes,
                num_clients,
                alpha,
                min_samples,
                &mut rng,
            )?
        }
        PartitionMethod::Pathological { shards_per_client } => {
            if shards_per_client == 0 {
                return Err(Error::NoShards);
            }
            if num_clients
                .checked_mul(shards_per_client)
                .is_none_or(|shards| shards > n)
            {
                return Err(Error::TooFewSamples {
                    samples: n,
                    num_clients,
                    needed: shards_per_client,
                    what: "shards of at least one sample",
                });
            }
            pathological(labels, num_clients, shards_per_client, &mut rng)
        }
    };
    if let Some((client, c)) = clients
        .iter()
        .enumerate()
        .find(|(_, c)| c.len() < min_samples)
    {
        return Err(Error::ClientTooSmall {
            method: method.name(),
            client,
            got: c.len(),
            min_samples,
        });
    }
    Ok(Partition::from_clients(clients))
}

/// Start of part `i` when `n` items are cut into `parts` near-equal parts.
fn cut(i: usize, n: usize, parts: usize) -> usize {
    // u128: i * n cannot overflow.
    (i as u128 * n as u128 / parts as u128) as usize
}

/// IID: shuffle, then near-equal contiguous parts.
/// One client per natural owner: the samples of group `g` (`groups[i]` is sample `i`'s owner)
/// go to one client. Owners with fewer than `min_samples` samples are left out; when there are
/// more owners than `num_clients`, a seeded random choice of `num_clients` of them is taken
/// (LEAF's sampling of users), in ascending group order.
///
/// # Errors
/// [`Error::NoClients`]; [`Error::TooFewSamples`] when fewer than `num_clients` owners have
/// `min_samples` samples.
pub fn partition_natural(
    groups: &[u32],
    num_clients: usize,
    seed: u64,
    min_samples: usize,
) -> Result<Partition> {
    if num_clients == 0 {
        return Err(Error::NoClients);
    }
    let mut by_group: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &g) in groups.iter().enumerate() {
        by_group.entry(g).or_default().push(i);
    }
    by_group.retain(|_, v| v.len() >= min_samples.max(1));
    if by_group.len() < num_clients {
        return Err(Error::TooFewSamples {
            samples: by_group.len(),
            num_clients,
            needed: 1,
            what: "owners (the natural partition gives each client one owner's samples)",
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen: Vec<u32> = by_group.keys().copied().collect();
    if chosen.len() > num_clients {
        chosen = rand::seq::index::sample(&mut rng, chosen.len(), num_clients)
            .into_iter()
            .map(|i| chosen[i])
            .collect();
        chosen.sort_unstable();
    }
    let clients = chosen
        .iter()
        .map(|g| by_group.remove(g).unwrap_or_default())
        .collect();
    Ok(Partition {
        clients,
        groups: Some(chosen),
    })
}

fn homo(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(rng);
    (0..k)
        .map(|c| perm[cut(c, n, k)..cut(c + 1, n, k)].to_vec())
        .collect()
}

/// McMahan et al.'s shards of label-sorted samples.
fn pathological(labels: &[u32], k: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let n = labels.len();
    let mut sorted: Vec<usize> = (0..n).collect();
    sorted.sort_by_key(|&i| labels[i]); // stable: equal labels keep index order
    let shards = k * s;
    let mut order: Vec<usize> = (0..shards).collect();
    order.shuffle(rng);
    order
        .chunks_exact(s)
        .map(|mine| {
            mine.iter()
                .flat_map(|&j| {
                    sorted[cut(j, n, shards)..cut(j + 1, n, shards)]
                        .iter()
                        .copied()
                })
                .collect()
        })
        .collect()
}

/// Draws `ln X` for `X ~ Gamma(alpha, 1)`, stable for small `alpha` (where `X` itself underflows):
/// for `alpha < 1`, `X = Y · U^(1/alpha)` with `Y ~ Gamma(alpha + 1, 1)`, `U ~ Uniform(0, 1]`.
struct LogGamma {
    /// `Gamma(alpha, 1)` or `Gamma(alpha + 1, 1)`.
    gamma: Gamma<f64>,
    /// `Some(1 / alpha)` when boosting a small `alpha`.
    boost: Option<f64>,
}

impl LogGamma {
    /// A sampler for concentration `alpha > 0`.
    fn new(alpha: f64) -> Result<Self> {
        let (shape, boost) = if alpha < 1.0 {
            (alpha + 1.0, Some(1.0 / alpha))
        } else {
            (alpha, None)
        };
        let gamma = Gamma::new(shape, 1.0).map_err(|_| Error::InvalidAlpha { alpha })?;
        Ok(LogGamma { gamma, boost })
    }

    /// One draw of `ln X`.
    fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        let y = self.gamma.sample(rng).max(f64::MIN_POSITIVE).ln();
        match self.boost {
            Some(inv_alpha) => {
                let u = 1.0 - rng.random::<f64>(); // in (0, 1]
                y + u.ln() * inv_alpha
            }
            None => y,
        }
    }
}

/// FedML's Dirichlet label-skew partition, redrawn until every client has `min_samples`.
fn hetero(
    labels: &[u32],
    num_classes: usize,
    k: usize,
    alpha: f64,
    min_samples: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>> {
    let n = labels.len();
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let log_gamma = LogGamma::new(alpha)?;
    let cap = n as f64 / k as f64;
    let mut logs = vec![0.0f64; k];
    let mut props = vec![0.0f64; k];
    let mut smallest = 0;
    for attempt in 1..=HETERO_MAX_ATTEMPTS {
        let mut batches: Vec<Vec<usize>> = vec![Vec::new(); k];
        for class_idx in &by_class {
            let mut idx = class_idx.clone();
            idx.shuffle(rng);
            for l in logs.iter_mut() {
                *l = log_gamma.sample(rng);
            }
            // Design: the Dirichlet draw, masked to clients below the cap and renormalized, is
            // computed as a softmax of log-gamma draws over the eligible clients. That equals
            // FedML's `p * mask / sum(p * mask)` but cannot underflow to 0/0 for tiny alpha.
            let eligible = |j: usize| (batches[j].len() as f64) < cap;
            // Some client is always below the cap (fewer than N samples are placed before the last
            // class); if not, fall back to all clients rather than divide by zero.
            let any = (0..k).any(eligible);
            let max = (0..k)
                .filter(|&j| !any || eligible(j))
                .map(|j| logs[j])
                .fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for j in 0..k {
                props[j] = if !any || eligible(j) {
                    (logs[j] - max).exp()
                } else {
                    0.0
                };
                sum += props[j];
            }
            // Cut points: floor(cumsum(p) * len) for the first k-1 clients, as numpy's astype(int).
            let len = idx.len();
            let mut start = 0;
            let mut cum = 0.0;
            for j in 0..k {
                let end = if j + 1 == k {
                    len
                } else {
                    cum += props[j] / sum;
                    ((cum * len as f64) as usize).clamp(start, len)
                };
                batches[j].extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        smallest = batches.iter().map(Vec::len).min().unwrap_or(0);
        if smallest >= min_samples {
            tracing::debug!(attempt, smallest, alpha, "hetero partition done");
            return Ok(batches);
        }
    }
    Err(Error::PartitionFailed {
        attempts: HETERO_MAX_ATTEMPTS,
        smallest,
        min_samples,
        alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fedml_names() {
        assert_eq!(
            "homo".parse::<PartitionMethod>().unwrap(),
            PartitionMethod::Homo
        );
        assert_eq!(
            "Hetero".parse::<PartitionMethod>().unwrap(),
            PartitionMethod::Hetero { alpha: 0.5 }
        );
        assert_eq!(
            PartitionMethod::from_args("hetero", 0.1, 2).unwrap(),
            PartitionMethod::Hetero { alpha: 0.1 }
        );
        assert_eq!(
            PartitionMethod::from_args("pathological", 0.1, 3).unwrap(),
            PartitionMethod::Pathological {
                shards_per_client: 3
            }
        );
        let e = "dirichlet".parse::<PartitionMethod>().unwrap_err();
        assert!(e.to_string().contains("dirichlet") && e.to_string().contains("pathological"));
    }

    #[test]
    fn rejects_impossible_requests_up_front() {
        let labels = vec![0u32; 100];
        let p = |k, m, min| partition(&labels, 1, k, m, 0, min);
        assert!(matches!(
            p(0, PartitionMethod::Homo, 0),
            Err(Error::NoClients)
        ));
        assert!(matches!(
            p(11, PartitionMethod::Homo, 10),
            Err(Error::TooFewSamples { .. })
        ));
        assert!(matches!(
            p(2, PartitionMethod::Hetero { alpha: 0.0 }, 0),
            Err(Error::InvalidAlpha { .. })
        ));
        assert!(matches!(
            p(2, PartitionMethod::Hetero { alpha: f64::NAN }, 0),
            Err(Error::InvalidAlpha { .. })
        ));
        assert!(matches!(
            p(
                2,
                PartitionMethod::Pathological {
                    shards_per_client: 0
                },
                0
            ),
            Err(Error::NoShards)
        ));
        assert!(matches!(
            p(
                51,
                PartitionMethod::Pathological {
                    shards_per_client: 2
                },
                0
            ),
            Err(Error::TooFewSamples { .. })
        ));
        assert!(matches!(
            partition(&[0, 3], 3, 1, PartitionMethod::Homo, 0, 0),
            Err(Error::InvalidLabel {
                index: 1,
                label: 3,
                ..
            })
        ));
    }

    #[test]
    fn hetero_gives_up_with_clear_error() {
        // One class, tiny alpha, every client needs half its fair share: the cap lets the first
        // draw's winner take nearly all, so this cannot hold in practice.
        let labels = vec![0u32; 100];
        let e = partition(
            &labels,
            1,
            10,
            PartitionMethod::Hetero { alpha: 1e-3 },
            1,
            9,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::PartitionFailed {
                    attempts: HETERO_MAX_ATTEMPTS,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("raise partition_alpha"));
    }

    #[test]
    fn tiny_alpha_does_not_produce_nan() {
        let labels: Vec<u32> = (0..1000).map(|i| (i % 10) as u32).collect();
        let p = partition(
            &labels,
            10,
            20,
            PartitionMethod::Hetero { alpha: 1e-6 },
            3,
            0,
        )
        .unwrap();
        assert_eq!(p.total_samples(), 1000);
    }

    #[test]
    fn homo_is_near_equal() {
        let labels = vec![0u32; 103];
        let p = partition(&labels, 1, 10, PartitionMethod::Homo, 5, 10).unwrap();
        let sizes = p.sizes();
        assert_eq!(sizes.iter().sum::<usize>(), 103);
        assert!(sizes.iter().all(|&s| s == 10 || s == 11), "{sizes:?}");
    }

    #[test]
    fn natural_gives_each_client_one_owner() {
        // Owners 7, 3, 5 with 3, 2 and 1 samples, interleaved.
        let groups = [7, 3, 7, 5, 3, 7];
        let p = partition_natural(&groups, 3, 0, 1).unwrap();
        assert_eq!(p.groups, Some(vec![3, 5, 7]));
        assert_eq!(p.clients, vec![vec![1, 4], vec![3], vec![0, 2, 5]]);
        // Owners below the minimum are left out; then too few owners is an error naming them.
        let p = partition_natural(&groups, 2, 0, 2).unwrap();
        assert_eq!(p.groups, Some(vec![3, 7]));
        let err = partition_natural(&groups, 3, 0, 2).unwrap_err();
        assert!(err.to_string().contains("owners"), "{err}");
        assert!(matches!(
            partition_natural(&groups, 0, 0, 1),
            Err(Error::NoClients)
        ));
        // The method itself needs owners: a set without them cannot take it.
        assert!(matches!(
            partition(&[0, 1, 0, 1], 2, 2, PartitionMethod::Natural, 0, 1),
            Err(Error::NoOwners)
        ));
    }

    #[test]
    fn natural_samples_owners_with_the_seed() {
        let groups: Vec<u32> = (0..1000).map(|i| i % 100).collect();
        let a = partition_natural(&groups, 10, 1, 1).unwrap();
        assert_eq!(a, partition_natural(&groups, 10, 1, 1).unwrap());
        assert_ne!(
            a.groups,
            partition_natural(&groups, 10, 2, 1).unwrap().groups
        );
        let owners = a.groups.clone().unwrap();
        assert!(
            owners.windows(2).all(|w| w[0] < w[1]),
            "ascending: {owners:?}"
        );
        for (c, samples) in a.clients.iter().enumerate() {
            assert_eq!(samples.len(), 10);
            assert!(samples.iter().all(|&i| groups[i] == owners[c]));
        }
    }
}
