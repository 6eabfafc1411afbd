//! [`ImageDataset`]: u8 images with labels, normalized on the fly, and [`load`] for the built-in
//! image sets.
//!
//! Design: pixels stay `u8` (a quarter of the memory of `f32`) and are normalized per batch through
//! a 256-entry lookup table per channel. Clients never copy the set: a federated partition is a list
//! of sample indices into one shared `Arc<ImageDataset>`.

use super::cifar;
use super::fetch::{fetch, FetchOptions};
use super::idx::{check_dims, read_idx, IdxArray};
use super::{DataSplit, Dataset, DatasetKind, Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The four IDX files of an MNIST-like set, as (train images, train labels, test images, test
/// labels).
pub const MNIST_LIKE_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// A labelled set of images stored as channel-first `u8` pixels.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    /// Short name used in logs, e.g. `mnist-train`.
    name: String,
    /// `[channels, height, width]` of one image.
    shape: [usize; 3],
    /// All pixels, `len × channels × height × width`, channel-first within an image.
    pixels: Vec<u8>,
    /// One label per image, each `< num_classes`.
    labels: Vec<u32>,
    /// Number of classes.
    num_classes: usize,
    /// Per-channel mean of `x / 255`, subtracted when gathering features.
    mean: Vec<f32>,
    /// Per-channel standard deviation; features are divided by it.
    std: Vec<f32>,
    /// Per-channel lookup tables: `lut[c * 256 + v] = (v / 255 - mean[c]) / std[c]`.
    lut: Vec<f32>,
}

impl ImageDataset {
    /// Builds a set from raw parts.
    ///
    /// # Errors
    /// [`Error::InvalidDataset`] when `pixels` is not `labels.len()` images of `shape`, `mean`/`std`
    /// do not have one entry per channel, a `std` is not positive, or `num_classes` is 0;
    /// [`Error::LabelOutOfRange`] when a label is `>= num_classes`.
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        pixels: Vec<u8>,
        labels: Vec<u32>,
        num_classes: usize,
        mean: &[f32],
        std: &[f32],
    ) -> Result<Self> {
        let name = name.into();
        let invalid = |reason: String| Error::InvalidDataset {
            name: name.clone(),
            reason,
        };
        let per_image = shape.iter().product::<usize>();
        if per_image == 0 {
            return Err(invalid(format!(
                "image shape {shape:?} has a zero dimension"
            )));
        }
        if Some(pixels.len()) != labels.len().checked_mul(per_image) {
            return Err(invalid(format!(
                "{} pixel bytes are not {} images of shape {shape:?} ({} bytes)",
                pixels.len(),
                labels.len(),
                labels.len().saturating_mul(per_image)
            )));
        }
        if num_classes == 0 {
            return Err(invalid("num_classes is 0".into()));
        }
        let channels = shape[0];
        if mean.len() != channels || std.len() != channels {
            return Err(invalid(format!(
                "{channels} channels need {channels} mean and std values, got {} and {}",
                mean.len(),
                std.len()
            )));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(invalid(format!("std {s} is not a positive number")));
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            return Err(Error::LabelOutOfRange {
                path: PathBuf::from(&name),
                index,
                label,
                num_classes,
            });
        }
        let lut = (0..channels)
            .flat_map(|c| (0..256).map(move |v| (v as f32 / 255.0 - mean[c]) / std[c]))
            .collect();
        Ok(ImageDataset {
            name,
            shape,
            pixels,
            labels,
            num_classes,
            mean: mean.to_vec(),
            std: std.to_vec(),
            lut,
        })
    }

    /// Builds a grey-scale set from parsed IDX images `[n, rows, cols]` and labels `[n]`.
    ///
    /// `images_path`/`labels_path` only name the sources in errors.
    ///
    /// # Errors
    /// [`Error::BadDims`], [`Error::CountMismatch`], [`Error::LabelOutOfRange`] (naming the labels
    /// file), or as [`ImageDataset::new`].
    #[allow(clippy::too_many_arguments)]
    pub fn from_idx(
        name: impl Into<String>,
        images: IdxArray,
        labels: IdxArray,
        images_path: &Path,
        labels_path: &Path,
        num_classes: usize,
        mean: &[f32],
        std: &[f32],
    ) -> Result<Self> {
        check_dims(&images, 3, "images", images_path)?;
        check_dims(&labels, 1, "labels", labels_path)?;
        if images.len() != labels.len() {
            return Err(Error::CountMismatch {
                images: images_path.to_path_buf(),
                labels: labels_path.to_path_buf(),
                n_images: images.len(),
                n_labels: labels.len(),
            });
        }
        if let Some((index, &label)) = labels
            .data
            .iter()
            .enumerate()
            .find(|(_, &l)| usize::from(l) >= num_classes)
        {
            return Err(Error::LabelOutOfRange {
                path: labels_path.to_path_buf(),
                index,
                label: u32::from(label),
                num_classes,
            });
        }
        let shape = [1, images.dims[1], images.dims[2]];
        let labels = labels.data.iter().map(|&l| u32::from(l)).collect();
        ImageDataset::new(name, shape, images.data, labels, num_classes, mean, std)
    }

    /// Reads a grey-scale set from an IDX images file and an IDX labels file (raw or gzipped).
    ///
    /// # Errors
    /// As [`read_idx`](super::read_idx) for either file, then as [`ImageDataset::from_idx`].
    pub fn from_idx_files(
        name: impl Into<String>,
        images_path: &Path,
        labels_path: &Path,
        num_classes: usize,
        mean: &[f32],
        std: &[f32],
    ) -> Result<Self> {
        let images = read_idx(images_path)?;
        let labels = read_idx(labels_path)?;
        Self::from_idx(
            name,
            images,
            labels,
            images_path,
            labels_path,
            num_classes,
            mean,
            std,
        )
    }

    /// The raw pixels, `len × channels × height × width`.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Per-channel mean used for normalization.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Per-channel standard deviation used for normalization.
    pub fn std(&self) -> &[f32] {
        &self.std
    }
}

impl Dataset for ImageDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn sample_shape(&self) -> &[usize] {
        &self.shape
    }

    fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Appends `(x / 255 - mean[c]) / std[c]` for every pixel of the samples `idx`.
    ///
    /// # Panics
    /// When an index is `>= len()` (the trait's contract: indices come from partitions of this set).
    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        let plane = self.shape[1] * self.shape[2];
        let per_image = self.shape[0] * plane;
        out.reserve(idx.len() * per_image);
        for &i in idx {
            let image = &self.pixels[i * per_image..(i + 1) * per_image];
            for (c, channel) in image.chunks_exact(plane).enumerate() {
                let lut = &self.lut[c * 256..(c + 1) * 256];
                out.extend(channel.iter().map(|&v| lut[usize::from(v)]));
            }
        }
    }
}

/// Loads the train and test splits of a built-in image set from `cache_dir`.
///
/// MNIST and Fashion-MNIST are read from `<cache_dir>/<kind.dir_name()>/` (the four IDX files of
/// [`MNIST_LIKE_FILES`], raw or with a `.gz` suffix). When a file is missing and `auto_fetch` is
/// true, the set is [`fetch`]ed first. CIFAR-10 is read from `<cache_dir>/cifar-10-batches-bin/`
/// and cannot be fetched.
///
/// # Errors
/// [`Error::MissingFiles`] when files are missing and `auto_fetch` is false,
/// [`Error::NotFetchable`] for missing CIFAR-10 files, any [`fetch`] error, or a parse error naming
/// the bad file.
pub fn load(
    kind: DatasetKind,
    cache_dir: &Path,
    auto_fetch: bool,
    opts: &FetchOptions,
) -> Result<DataSplit> {
    match kind {
        DatasetKind::Cifar10 => return cifar::load_cifar10(&cache_dir.join(kind.dir_name())),
        DatasetKind::Shakespeare
        | DatasetKind::Movielens100k
        | DatasetKind::Movielens100kRandom => {
            return super::load_text_or_ratings(kind, cache_dir, auto_fetch, opts)
        }
        _ => {}
    }
    let dir = cache_dir.join(kind.dir_name());
    let mut paths = locate_all(&dir);
    if paths.iter().any(Option::is_none) {
        if !auto_fetch {
            let missing = MNIST_LIKE_FILES
                .iter()
                .zip(&paths)
                .filter(|(_, p)| p.is_none())
                .map(|(n, _)| n.to_string())
                .collect();
            return Err(Error::MissingFiles {
                dataset: kind.name().into(),
                dir,
                missing,
                hint: format!(
                    "enable auto_fetch (data_args.auto_fetch) or fetch the set first (`fedmq data fetch {}`), or place the IDX files there by hand",
                    kind.name()
                ),
            });
        }
        fetch(kind, cache_dir, opts)?;
        paths = locate_all(&dir);
    }
    let [Some(tr_x), Some(tr_y), Some(te_x), Some(te_y)] = paths else {
        // fetch() succeeded, so the files exist; a concurrent deletion lands here.
        return Err(Error::MissingFiles {
            dataset: kind.name().into(),
            dir,
            missing: MNIST_LIKE_FILES.iter().map(|s| s.to_string()).collect(),
            hint: "the files disappeared after fetching; fetch again".into(),
        });
    };
    let name = kind.dir_name();
    let train = ImageDataset::from_idx_files(
        format!("{name}-train"),
        &tr_x,
        &tr_y,
        kind.num_classes(),
        kind.mean(),
        kind.std(),
    )?;
    let test = ImageDataset::from_idx_files(
        format!("{name}-test"),
        &te_x,
        &te_y,
        kind.num_classes(),
        kind.mean(),
        kind.std(),
    )?;
    tracing::info!(dataset = %kind, train = train.len(), test = test.len(), dir = %dir.display(), "loaded data set");
    Ok(DataSplit {
        train: Arc::new(train),
        test: Arc::new(test),
    })
}

/// Finds each of [`MNIST_LIKE_FILES`] in `dir`, raw or `.gz`.
fn locate_all(dir: &Path) -> [Option<PathBuf>; 4] {
    MNIST_LIKE_FILES.map(|name| {
        let raw = dir.join(name);
        let gz = dir.join(format!("{name}.gz"));
        if raw.is_file() {
            Some(raw)
        } else if gz.is_file() {
            Some(gz)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::encode_idx;

    #[test]
    fn gather_normalizes_per_channel() {
        let pixels = vec![0, 255, 51, 102, /* image 2 */ 255, 255, 0, 0];
        let ds = ImageDataset::new(
            "t",
            [2, 1, 2],
            pixels,
            vec![0, 1],
            2,
            &[0.0, 0.5],
            &[1.0, 0.5],
        )
        .unwrap();
        let mut out = Vec::new();
        ds.gather_features(&[1, 0], &mut out);
        let want = [1.0, 1.0, -1.0, -1.0, 0.0, 1.0, -0.6, -0.2];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        assert_eq!(ds.sample_shape(), &[2, 1, 2]);
    }

    #[test]
    fn new_rejects_inconsistent_parts() {
        let e = ImageDataset::new("t", [1, 2, 2], vec![0; 7], vec![0, 0], 2, &[0.], &[1.]);
        assert!(matches!(e, Err(Error::InvalidDataset { .. })));
        let e = ImageDataset::new("t", [1, 1, 1], vec![0; 2], vec![0, 5], 2, &[0.], &[1.]);
        assert!(matches!(
            e,
            Err(Error::LabelOutOfRange {
                index: 1,
                label: 5,
                ..
            })
        ));
        let e = ImageDataset::new("t", [1, 1, 1], vec![0; 1], vec![0], 2, &[0.], &[0.]);
        assert!(matches!(e, Err(Error::InvalidDataset { .. })));
    }

    #[test]
    fn load_without_fetch_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(
            DatasetKind::Mnist,
            dir.path(),
            false,
            &FetchOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(&err, Error::MissingFiles { missing, .. } if missing.len() == 4));
        assert!(err.to_string().contains("train-images-idx3-ubyte"));
    }

    #[test]
    fn load_reads_mixed_raw_and_gz_files() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("fashion-mnist");
        std::fs::create_dir_all(&d).unwrap();
        let imgs = encode_idx(&[3, 28, 28], &[7; 3 * 784]).unwrap();
        let labs = encode_idx(&[3], &[0, 9, 4]).unwrap();
        std::fs::write(d.join(MNIST_LIKE_FILES[0]), &imgs).unwrap();
        std::fs::write(d.join(MNIST_LIKE_FILES[1]), &labs).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&imgs).unwrap();
        std::fs::write(
            d.join(format!("{}.gz", MNIST_LIKE_FILES[2])),
            gz.finish().unwrap(),
        )
        .unwrap();
        std::fs::write(d.join(MNIST_LIKE_FILES[3]), &labs).unwrap();
        let split = load(
            DatasetKind::FashionMnist,
            dir.path(),
            false,
            &FetchOptions::default(),
        )
        .unwrap();
        assert_eq!(split.train.len(), 3);
        assert_eq!(split.test.labels(), &[0, 9, 4]);
        assert_eq!(split.test.name(), "fashion-mnist-test");
    }
}
