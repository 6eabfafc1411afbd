//! Blob throughput benchmark: put and get (with digest verification) of random blobs, reported as
//! medians in MiB/s. The CLI (`fedmq bench blob`) only parses flags, starts a store and prints.
//!
//! What is timed is what a participant pays: `put` includes computing the SHA-256 for the
//! [`BlobRef`](crate::proto::BlobRef); `get` includes checking length and SHA-256. Creating the
//! random data and deleting the blob after each run are not timed.

use crate::store::{BlobStore, Result, MIB};
use bytes::Bytes;
use rand::RngCore;
use serde::Serialize;
use std::time::Instant;

/// One line of benchmark output: one blob size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BlobBenchResult {
    /// Always `"blob"`.
    pub bench: &'static str,
    /// Blob size in MiB.
    pub size_mib: usize,
    /// Median put throughput (MiB/s).
    pub put_mib_s: f64,
    /// Median get throughput, digest verified (MiB/s).
    pub get_mib_s: f64,
    /// Median of size / (put time + get time) per run (MiB/s): one producer-to-consumer hop.
    pub put_get_mib_s: f64,
    /// Median put time (s).
    pub put_s: f64,
    /// Median get time (s).
    pub get_s: f64,
    /// Runs measured.
    pub runs: usize,
    /// Multipart part / ranged-GET size (MiB).
    pub part_size_mib: f64,
    /// Parts or ranges in flight per blob.
    pub concurrency: usize,
    /// Whether request payloads were SigV4-signed.
    pub sign_payload: bool,
    /// `embedded` or the external endpoint.
    pub store: String,
}

/// Measures `runs` put+get round trips of a random `size_mib` MiB blob under `key_prefix`.
///
/// # Errors
/// Any store error (the blob of a failed run may be left behind under `key_prefix`).
pub async fn bench_blob_size(
    store: &BlobStore,
    store_label: &str,
    key_prefix: &str,
    size_mib: usize,
    runs: usize,
) -> Result<BlobBenchResult> {
    let runs = runs.max(1);
    let size = size_mib * MIB;
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    let data = Bytes::from(data);
    let (mut put_s, mut get_s, mut both) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let key = format!(
            "{}/blob-{size_mib}mib-{run}",
            key_prefix.trim_end_matches('/')
        );
        let t = Instant::now();
        let r = store.put(&key, data.clone()).await?;
        let tp = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let got = store.get(&r).await?;
        let tg = t.elapsed().as_secs_f64();
        drop(got);
        store.delete(&key).await?;
        tracing::debug!(size_mib, run, put_s = tp, get_s = tg, "blob bench run");
        put_s.push(tp);
        get_s.push(tg);
        both.push(tp + tg);
    }
    let mib = size as f64 / MIB as f64;
    let (mp, mg, mb) = (median(&mut put_s), median(&mut get_s), median(&mut both));
    let o = store.options();
    Ok(BlobBenchResult {
        bench: "blob",
        size_mib,
        put_mib_s: round1(mib / mp),
        get_mib_s: round1(mib / mg),
        put_get_mib_s: round1(mib / mb),
        put_s: round4(mp),
        get_s: round4(mg),
        runs,
        part_size_mib: o.part_size as f64 / MIB as f64,
        concurrency: o.concurrency,
        sign_payload: o.sign_payload,
        store: store_label.to_string(),
    })
}

/// Runs [`bench_blob_size`] for every size, handing each result to `emit` as soon as it is
/// measured.
///
/// # Errors
/// The first store error.
pub async fn bench_blob(
    store: &BlobStore,
    store_label: &str,
    key_prefix: &str,
    sizes_mib: &[usize],
    runs: usize,
    mut emit: impl FnMut(&BlobBenchResult),
) -> Result<Vec<BlobBenchResult>> {
    store.ensure_bucket().await?;
    let mut out = Vec::with_capacity(sizes_mib.len());
    for &size_mib in sizes_mib {
        let r = bench_blob_size(store, store_label, key_prefix, size_mib, runs).await?;
        emit(&r);
        out.push(r);
    }
    Ok(out)
}

/// The median (mean of the middle two for even counts); sorts `xs`.
fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
