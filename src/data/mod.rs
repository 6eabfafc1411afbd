//! Data sets: fetching by package name, loaders, and federated partitions.
//!
//! A data set is anything implementing [`Dataset`]: a label per sample (what partitioners need) and a
//! way to gather normalized features for a batch of sample indices (what the trainer needs). Image
//! sets (MNIST, Fashion-MNIST, CIFAR-10) are [`ImageDataset`]s; text (Shakespeare) and ratings
//! (MovieLens) sets implement the same trait with their own storage.

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
