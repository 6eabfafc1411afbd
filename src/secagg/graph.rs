//! Who shares with whom: SecAgg+'s random `k`-regular neighbour graph and the protocol's
//! parameters `t` (threshold) and `k` (degree) for `N` clients.
//!
//! **Graph.** The clients that advertised keys are sorted by id, shuffled with a seed the server
//! draws per round, and placed on a ring; each is joined to the `k/2` nearest on either side (a
//! Harary graph with random labels, Bell et al. 2020, §3). With `k = N − 1` it is the complete
//! graph of the original SecAgg. Every client learns its own neighbours from the roster.
//!
//! **Parameters.** A client's secrets are shared among its `k + 1` *holders* (its neighbours and
//! itself); `t` of them recover a secret. `t` is a strict majority of the holders,
//! `⌊(k + 1)/2⌋ + 1`, so the holders that survive a round recover what they must as long as
//! fewer than half of a neighbourhood drops, and fewer than `t` colluding clients learn nothing.
//! `k` is `N − 1` (the complete graph) up to 32 clients; above that, the smallest even number
//! `≥ 4·log2(N)` (28 for `N = 100`, 40 for `N = 1000`), the logarithmic degree that makes
//! SecAgg+'s server cost `O(N·k·P)` rather than `O(N²·P)`.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;

/// Up to this many clients, every client neighbours every other.
pub const COMPLETE_UP_TO: usize = 32;

/// Threshold and degree of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Shares that recover a secret (`t`).
    pub threshold: usize,
    /// Neighbours per client (`k`).
    pub degree: usize,
}

impl Params {
    /// The defaults for `n` selected clients (see the module docs).
    pub fn for_clients(n: usize) -> Self {
        let degree = default_degree(n);
        Self {
            threshold: majority(degree),
            degree,
        }
    }

    /// `for_clients(n)` with the given overrides (`fedmq_args.secagg_degree`,
    /// `secagg_threshold`; 0 keeps the default). The degree is capped at `n − 1` and made even
    /// below it (the ring needs `k/2` on each side); the threshold is capped at `k + 1`.
    pub fn with_overrides(n: usize, degree: usize, threshold: usize) -> Self {
        let max = n.saturating_sub(1);
        let degree = match degree {
            0 => default_degree(n),
            d if d >= max => max,
            d => d + (d % 2),
        }
        .min(max);
        let threshold = match threshold {
            0 => majority(degree),
            t => t.min(degree + 1),
        };
        Self { threshold, degree }
    }
}

fn majority(degree: usize) -> usize {
    degree.div_ceil(2) + 1
}

fn default_degree(n: usize) -> usize {
    if n <= COMPLETE_UP_TO {
        return n.saturating_sub(1);
    }
    let k = (4.0 * (n as f64).log2()).ceil() as usize;
    (k + k % 2).min(n - 1)
}

/// Each client's neighbours (sorted by id), for `clients` on a ring shuffled by `seed`.
/// `degree ≥ clients.len() − 1` gives the complete graph.
pub fn neighbours(clients: &[String], degree: usize, seed: u64) -> BTreeMap<String, Vec<String>> {
    let n = clients.len();
    let mut ring: Vec<&String> = clients.iter().collect();
    ring.sort();
    ring.dedup();
    let n = n.min(ring.len());
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if degree + 1 >= n {
        for c in &ring {
            let others = ring.iter().filter(|o| *o != c).map(|o| (*o).clone());
            out.insert((*c).clone(), others.collect());
        }
        return out;
    }
    ring.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let half = degree / 2;
    for (i, c) in ring.iter().enumerate() {
        let mut ns: Vec<String> = (1..=half)
            .flat_map(|d| [ring[(i + d) % n], ring[(i + n - d) % n]])
            .cloned()
            .collect();
        ns.sort();
        ns.dedup();
        out.insert((*c).clone(), ns);
    }
    out
}

/// The holders of `client`'s secrets in share order: its neighbours and itself, sorted by id.
/// The holder at position `p` gets the share at `x = p + 1`.
pub fn holders<'a>(client: &'a str, neighbours: &'a [String]) -> Vec<&'a str> {
    let mut h: Vec<&str> = neighbours.iter().map(String::as_str).collect();
    h.push(client);
    h.sort_unstable();
    h.dedup();
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("client-{i}")).collect()
    }

    #[test]
    fn parameters_follow_the_number_of_clients() {
        assert_eq!(
            Params::for_clients(10),
            Params {
                threshold: 6,
                degree: 9
            }
        );
        assert_eq!(Params::for_clients(2).threshold, 2);
        let p = Params::for_clients(100);
        assert_eq!((p.degree, p.threshold), (28, 15));
        assert_eq!(Params::for_clients(1000).degree, 40);
        assert_eq!(Params::with_overrides(100, 7, 0).degree, 8);
        assert_eq!(Params::with_overrides(10, 50, 99).threshold, 10);
    }

    #[test]
    fn the_graph_is_regular_symmetric_and_seeded() {
        let c = ids(100);
        let g = neighbours(&c, 28, 7);
        assert_eq!(g.len(), 100);
        for (a, ns) in &g {
            assert_eq!(ns.len(), 28, "{a}");
            assert!(!ns.contains(a));
            for b in ns {
                assert!(g[b].contains(a), "{a} -> {b} not symmetric");
            }
        }
        assert_eq!(g, neighbours(&c, 28, 7));
        assert_ne!(g, neighbours(&c, 28, 8));
        let full = neighbours(&ids(10), 9, 1);
        assert!(full.values().all(|ns| ns.len() == 9));
    }

    #[test]
    fn holders_include_the_owner_in_sorted_order() {
        let ns = vec!["b".to_string(), "d".to_string()];
        assert_eq!(holders("c", &ns), vec!["b", "c", "d"]);
    }
}
