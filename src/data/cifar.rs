//! CIFAR-10 binary batches (`cifar-10-batches-bin`).
//!
//! Each file is a sequence of 3073-byte records: one label byte (0–9), then 3072 pixel bytes, the
//! red, green and blue 32×32 planes in that order, each row-major. That is already the channel-first
//! layout of [`ImageDataset`], so records are copied as they are. The training set is
//! `data_batch_1.bin` … `data_batch_5.bin` (10,000 records each), the test set `test_batch.bin`.

use super::{DataSplit, DatasetKind, Error, ImageDataset, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Pixel bytes of one CIFAR-10 image (3 × 32 × 32).
pub const CIFAR10_IMAGE_BYTES: usize = 3 * 32 * 32;
/// Bytes of one record: a label byte and the image.
pub const CIFAR10_RECORD_BYTES: usize = 1 + CIFAR10_IMAGE_BYTES;
/// Training batch file names.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// Test batch file name.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// Appends the records of one CIFAR-10 batch held in memory to `pixels` and `labels`; returns the
/// number of records. `name` identifies the bytes in errors.
///
/// # Errors
/// [`Error::BadRecordSize`] when the length is zero or not a multiple of
/// [`CIFAR10_RECORD_BYTES`]; [`Error::LabelOutOfRange`] for a label above 9.
pub fn parse_cifar10_batch(
    bytes: &[u8],
    name: &str,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<usize> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR10_RECORD_BYTES) {
        return Err(Error::BadRecordSize {
            path: PathBuf::from(name),
            len: bytes.len() as u64,
            record: CIFAR10_RECORD_BYTES,
        });
    }
    let n = bytes.len() / CIFAR10_RECORD_BYTES;
    let classes = DatasetKind::Cifar10.num_classes();
    pixels.reserve(n * CIFAR10_IMAGE_BYTES);
    labels.reserve(n);
    // Every chunk is exactly one record (the length was checked above), so `rec[0]` exists.
    for (index, rec) in bytes.chunks_exact(CIFAR10_RECORD_BYTES).enumerate() {
        let label = rec[0];
        if usize::from(label) >= classes {
            return Err(Error::LabelOutOfRange {
                path: PathBuf::from(name),
                index,
                label: u32::from(label),
                num_classes: classes,
            });
        }
        labels.push(u32::from(label));
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(n)
}

/// Reads CIFAR-10 batch files into one [`ImageDataset`] normalized with the CIFAR-10 mean/std.
///
/// # Errors
/// [`Error::Io`] naming an unreadable file, or as [`parse_cifar10_batch`].
pub fn read_cifar10_batches(name: impl Into<String>, paths: &[PathBuf]) -> Result<ImageDataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        parse_cifar10_batch(
            &bytes,
            &path.display().to_string(),
            &mut pixels,
            &mut labels,
        )?;
    }
    let kind = DatasetKind::Cifar10;
    ImageDataset::new(
        name,
        kind.sample_shape(),
        pixels,
        labels,
        kind.num_classes(),
        kind.mean(),
        kind.std(),
    )
}

/// Loads CIFAR-10 from `dir` (the extracted `cifar-10-batches-bin` directory).
///
/// # Errors
/// [`Error::NotFetchable`] when any batch file is missing (naming where to put them), otherwise as
/// [`read_cifar10_batches`].
pub fn load_cifar10(dir: &Path) -> Result<DataSplit> {
    let train_paths: Vec<PathBuf> = CIFAR10_TRAIN_FILES.iter().map(|f| dir.join(f)).collect();
    let test_path = dir.join(CIFAR10_TEST_FILE);
    if train_paths.iter().chain([&test_path]).any(|p| !p.is_file()) {
        return Err(Error::NotFetchable {
            dataset: DatasetKind::Cifar10.name().into(),
            dir: dir.to_path_buf(),
        });
    }
    let train = read_cifar10_batches("cifar10-train", &train_paths)?;
    let test = read_cifar10_batches("cifar10-test", &[test_path])?;
    Ok(DataSplit {
        train: Arc::new(train),
        test: Arc::new(test),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, fill: [u8; 3]) -> Vec<u8> {
        let mut r = vec![label];
        for v in fill {
            r.extend(std::iter::repeat_n(v, 1024));
        }
        r
    }

    #[test]
    fn planes_map_to_channels() {
        let mut bytes = record(3, [255, 0, 128]);
        bytes.extend(record(9, [0, 0, 0]));
        let (mut px, mut lb) = (Vec::new(), Vec::new());
        assert_eq!(
            parse_cifar10_batch(&bytes, "b", &mut px, &mut lb).unwrap(),
            2
        );
        assert_eq!(lb, vec![3, 9]);
        assert_eq!(px.len(), 2 * CIFAR10_IMAGE_BYTES);
        assert_eq!((px[0], px[1024], px[2048]), (255, 0, 128));
    }

    #[test]
    fn bad_sizes_and_labels() {
        let (mut px, mut lb) = (Vec::new(), Vec::new());
        let mut bytes = record(1, [1, 2, 3]);
        bytes.pop();
        let e = parse_cifar10_batch(&bytes, "short.bin", &mut px, &mut lb).unwrap_err();
        assert!(matches!(e, Error::BadRecordSize { len: 3072, .. }));
        assert!(e.to_string().contains("short.bin"));
        let e = parse_cifar10_batch(&[], "empty.bin", &mut px, &mut lb).unwrap_err();
        assert!(matches!(e, Error::BadRecordSize { len: 0, .. }));
        let e = parse_cifar10_batch(&record(10, [0; 3]), "l.bin", &mut px, &mut lb).unwrap_err();
        assert!(matches!(e, Error::LabelOutOfRange { label: 10, .. }));
    }

    #[test]
    fn missing_dir_says_where_to_put_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cifar-10-batches-bin");
        let e = load_cifar10(&d).unwrap_err();
        assert!(matches!(e, Error::NotFetchable { .. }));
        let msg = e.to_string();
        assert!(msg.contains("cifar-10-batches-bin") && msg.contains("test_batch.bin"));
    }

    #[test]
    fn loads_generated_batches() {
        let dir = tempfile::tempdir().unwrap();
        for (i, f) in CIFAR10_TRAIN_FILES.iter().enumerate() {
            let mut b = record(i as u8, [10, 20, 30]);
            b.extend(record(7, [0, 0, 0]));
            std::fs::write(dir.path().join(f), b).unwrap();
        }
        std::fs::write(
            dir.path().join(CIFAR10_TEST_FILE),
            record(2, [255, 255, 255]),
        )
        .unwrap();
        let split = load_cifar10(dir.path()).unwrap();
        assert_eq!(split.train.len(), 10);
        assert_eq!(split.train.labels()[..4], [0, 7, 1, 7]);
        assert_eq!(split.test.len(), 1);
        assert_eq!(split.train.sample_shape(), &[3, 32, 32]);
        let mut f = Vec::new();
        split.test.gather_features(&[0], &mut f);
        assert_eq!(f.len(), 3072);
        let r = (1.0 - 0.491_399_7) / 0.247_032_33;
        assert!((f[0] - r).abs() < 1e-5);
    }
}
