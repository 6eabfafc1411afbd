//! [`PartitionStats`]: how many samples of which labels each client holds, and how skewed that is.
//!
//! The scalar skew is the mean, over non-empty clients, of the total-variation distance between a
//! client's label distribution and the global one (`½ Σ_c |p_client(c) − p_global(c)|`): 0 for
//! identical distributions, approaching 1 when clients hold disjoint rare labels. For ten balanced
//! classes, a client holding a single class is at 0.9.

use super::{Error, Partition, Result};
use serde::Serialize;
use std::fmt::Write as _;

/// Per-client sample counts and label histograms of a [`Partition`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionStats {
    /// Number of classes (length of every histogram).
    pub num_classes: usize,
    /// Samples per client.
    pub samples: Vec<usize>,
    /// `histograms[client][class]`: samples of that class held by that client.
    pub histograms: Vec<Vec<usize>>,
    /// Samples per class over all clients.
    pub global_histogram: Vec<usize>,
    /// Total-variation distance of each client's label distribution from the global one (0 for an
    /// empty client).
    pub client_skew: Vec<f64>,
    /// Mean of `client_skew` over non-empty clients (0 when all are empty).
    pub label_skew: f64,
    /// Smallest client.
    pub min_samples: usize,
    /// Mean samples per client.
    pub mean_samples: f64,
    /// Largest client.
    pub max_samples: usize,
}

impl PartitionStats {
    /// Computes the statistics of `partition` over `labels` (the labels of the partitioned set).
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] when a client holds an index `>= labels.len()`;
    /// [`Error::InvalidLabel`] when a label is `>= num_classes`.
    pub fn compute(partition: &Partition, labels: &[u32], num_classes: usize) -> Result<Self> {
        Self::build(partition, labels, num_classes, true)
    }

    /// Like [`PartitionStats::compute`], for a partition made by [`partition`](super::partition)
    /// from these very `labels`, where indices and labels are in range by construction. Should they
    /// not be, the offending samples are left out of the counts instead of failing.
    pub fn new(partition: &Partition, labels: &[u32], num_classes: usize) -> Self {
        match Self::build(partition, labels, num_classes, false) {
            Ok(s) => s,
            // Unreachable: `build` only fails when `strict` is set.
            Err(_) => Self::from_histograms(num_classes, Vec::new()),
        }
    }

    /// Counts labels per client; out-of-range indices or labels are errors when `strict`, skipped
    /// otherwise.
    fn build(
        partition: &Partition,
        labels: &[u32],
        num_classes: usize,
        strict: bool,
    ) -> Result<Self> {
        let mut histograms = Vec::with_capacity(partition.num_clients());
        for (client, idx) in partition.clients().iter().enumerate() {
            let mut h = vec![0usize; num_classes];
            for &i in idx {
                let Some(&label) = labels.get(i) else {
                    if strict {
                        return Err(Error::IndexOutOfRange {
                            client,
                            index: i,
                            len: labels.len(),
                        });
                    }
                    continue;
                };
                match h.get_mut(label as usize) {
                    Some(slot) => *slot += 1,
                    None if strict => {
                        return Err(Error::InvalidLabel {
                            index: i,
                            label,
                            num_classes,
                        })
                    }
                    None => {}
                }
            }
            histograms.push(h);
        }
        Ok(Self::from_histograms(num_classes, histograms))
    }

    /// Derives every statistic from per-client label histograms.
    fn from_histograms(num_classes: usize, histograms: Vec<Vec<usize>>) -> Self {
        let samples: Vec<usize> = histograms.iter().map(|h| h.iter().sum()).collect();
        let mut global_histogram = vec![0usize; num_classes];
        for h in &histograms {
            for (g, v) in global_histogram.iter_mut().zip(h) {
                *g += v;
            }
        }
        let total: usize = samples.iter().sum();
        let client_skew: Vec<f64> = histograms
            .iter()
            .zip(&samples)
            .map(|(h, &n)| {
                if n == 0 || total == 0 {
                    return 0.0;
                }
                0.5 * h
                    .iter()
                    .zip(&global_histogram)
                    .map(|(&c, &g)| (c as f64 / n as f64 - g as f64 / total as f64).abs())
                    .sum::<f64>()
            })
            .collect();
        let non_empty = samples.iter().filter(|&&n| n > 0).count();
        let label_skew = if non_empty == 0 {
            0.0
        } else {
            client_skew.iter().sum::<f64>() / non_empty as f64
        };
        let k = samples.len();
        PartitionStats {
            num_classes,
            min_samples: samples.iter().copied().min().unwrap_or(0),
            max_samples: samples.iter().copied().max().unwrap_or(0),
            mean_samples: if k == 0 { 0.0 } else { total as f64 / k as f64 },
            samples,
            histograms,
            global_histogram,
            client_skew,
            label_skew,
        }
    }

    /// A plain-text table: one row per client (samples, skew, then the count of each class), and a
    /// footer with min/mean/max samples and the mean label skew.
    pub fn render_table(&self) -> String {
        let digits = |v: usize| v.to_string().len();
        let cw = self
            .histograms
            .iter()
            .flatten()
            .chain(&self.global_histogram)
            .map(|&v| digits(v))
            .chain((0..self.num_classes).map(|c| digits(c) + 1))
            .max()
            .unwrap_or(1);
        let client_w = digits(self.samples.len().saturating_sub(1)).max("client".len());
        let samples_w = digits(self.global_histogram.iter().sum()).max("samples".len());
        let mut out = String::new();
        // Writing to a String cannot fail; results are ignored below for that reason.
        let _ = write!(
            out,
            "{:>client_w$}  {:>samples_w$}  {:>5}",
            "client", "samples", "skew"
        );
        for c in 0..self.num_classes {
            let _ = write!(out, " {:>cw$}", format!("c{c}"));
        }
        out.push('\n');
        let rule = out.trim_end().len();
        out.push_str(&"-".repeat(rule));
        out.push('\n');
        for (i, h) in self.histograms.iter().enumerate() {
            let _ = write!(
                out,
                "{i:>client_w$}  {:>samples_w$}  {:>5.3}",
                self.samples[i], self.client_skew[i]
            );
            for v in h {
                let _ = write!(out, " {v:>cw$}");
            }
            out.push('\n');
        }
        out.push_str(&"-".repeat(rule));
        out.push('\n');
        let _ = write!(
            out,
            "{:>client_w$}  {:>samples_w$}  {:>5}",
            "all",
            self.global_histogram.iter().sum::<usize>(),
            ""
        );
        for v in &self.global_histogram {
            let _ = write!(out, " {v:>cw$}");
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "{} clients; samples per client min {}, mean {:.1}, max {}; label skew (mean TV distance to global) {:.3}",
            self.samples.len(),
            self.min_samples,
            self.mean_samples,
            self.max_samples,
            self.label_skew
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_skew() {
        let labels = [0, 0, 1, 1];
        let p = Partition::from_clients(vec![vec![0, 1], vec![2, 3]]);
        let s = PartitionStats::compute(&p, &labels, 2).unwrap();
        assert_eq!(s.samples, vec![2, 2]);
        assert_eq!(s.histograms, vec![vec![2, 0], vec![0, 2]]);
        assert!((s.label_skew - 0.5).abs() < 1e-12);
        let iid = Partition::from_clients(vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(
            PartitionStats::compute(&iid, &labels, 2)
                .unwrap()
                .label_skew,
            0.0
        );
        let table = s.render_table();
        assert!(
            table.contains("samples") && table.contains("c1") && table.contains("0.500"),
            "{table}"
        );
        assert_eq!(table.lines().count(), 7, "{table}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["samples"][1], 2);
    }

    #[test]
    fn bad_indices_are_errors() {
        let p = Partition::from_clients(vec![vec![0, 9]]);
        let e = PartitionStats::compute(&p, &[0, 1], 2).unwrap_err();
        assert!(matches!(
            e,
            Error::IndexOutOfRange {
                client: 0,
                index: 9,
                len: 2
            }
        ));
        let e = PartitionStats::compute(&Partition::from_clients(vec![vec![1]]), &[0, 5], 2)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidLabel { label: 5, .. }));
    }

    #[test]
    fn new_skips_what_compute_rejects() {
        let p = Partition::from_clients(vec![vec![0, 1, 9]]);
        let s = PartitionStats::new(&p, &[0, 5], 2);
        assert_eq!(s.samples, vec![1]);
        let ok = Partition::from_clients(vec![vec![0], vec![1]]);
        assert_eq!(
            PartitionStats::new(&ok, &[0, 1], 2),
            PartitionStats::compute(&ok, &[0, 1], 2).unwrap()
        );
    }

    #[test]
    fn empty_clients_do_not_count_towards_skew() {
        let p = Partition::from_clients(vec![vec![0, 1], vec![]]);
        let s = PartitionStats::compute(&p, &[0, 1], 2).unwrap();
        assert_eq!(s.label_skew, 0.0);
        assert_eq!((s.min_samples, s.max_samples), (0, 2));
    }
}
