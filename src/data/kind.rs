//! [`DatasetKind`]: the data sets fedmq knows by name, and where they are cached.

use super::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The valid data set names, as listed in errors.
const VALID_NAMES: &str = "mnist, fashion_mnist (or fashion-mnist, fmnist), cifar10, shakespeare, \
                           movielens_100k (per-user temporal split), movielens_100k_random \
                           (random 80/20 split)";

/// A built-in data set, named as FedML's `data_args.dataset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// MNIST handwritten digits: 60k/10k grey 28×28 images, 10 classes.
    Mnist,
    /// Fashion-MNIST: 60k/10k grey 28×28 images of clothing, 10 classes.
    #[serde(alias = "fashion-mnist", alias = "fmnist")]
    FashionMnist,
    /// CIFAR-10: 50k/10k colour 32×32 images, 10 classes.
    Cifar10,
    /// Shakespeare's plays, next-character prediction, one owner per (play, role) (LEAF).
    Shakespeare,
    /// MovieLens-100k ratings, one owner per user; the last 20 % of each user's ratings by time
    /// are the test set.
    #[serde(
        rename = "movielens_100k",
        alias = "movielens",
        alias = "ml-100k",
        alias = "ml_100k"
    )]
    Movielens100k,
    /// MovieLens-100k with a random 80/20 split of all ratings (seed 0), as Surprise's and most
    /// papers' figures.
    #[serde(rename = "movielens_100k_random")]
    Movielens100kRandom,
}

impl DatasetKind {
    /// Every kind, in a fixed order.
    pub const ALL: [DatasetKind; 6] = [
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Shakespeare,
        DatasetKind::Movielens100k,
        DatasetKind::Movielens100kRandom,
    ];

    /// FedML's name (`mnist`, `fashion_mnist`, `cifar10`, `shakespeare`, `movielens_100k`,
    /// `movielens_100k_random`).
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion_mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Shakespeare => "shakespeare",
            DatasetKind::Movielens100k => "movielens_100k",
            DatasetKind::Movielens100kRandom => "movielens_100k_random",
        }
    }

    /// Whether the set is made of images (what backdoor triggers and pixel normalization apply
    /// to).
    pub fn is_image(self) -> bool {
        matches!(
            self,
            DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Cifar10
        )
    }

    /// Directory under the cache directory holding this set's files.
    pub fn dir_name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar-10-batches-bin",
            DatasetKind::Shakespeare => "shakespeare",
            DatasetKind::Movielens100k | DatasetKind::Movielens100kRandom => "ml-100k",
        }
    }

    /// Number of classes: 10 for the image sets, the 81 symbols for Shakespeare, the 5 rating
    /// values for MovieLens (whose target is the rating itself).
    pub fn num_classes(self) -> usize {
        match self {
            DatasetKind::Shakespeare => super::shakespeare::VOCAB_SIZE,
            DatasetKind::Movielens100k | DatasetKind::Movielens100kRandom => 5,
            _ => 10,
        }
    }

    /// Shape of one image: `[channels, height, width]` (`[0, 0, 0]` for sets that are not
    /// images).
    pub fn sample_shape(self) -> [usize; 3] {
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
            _ => [0, 0, 0],
        }
    }

    /// What a model sees of this set (inputs, sample shape, target), without loading it.
    pub fn spec(self) -> super::DataSpec {
        use super::{DataSpec, Input, Target};
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Cifar10 => {
                DataSpec::image(&self.sample_shape(), self.num_classes())
            }
            DatasetKind::Shakespeare => DataSpec {
                input: Input::Tokens {
                    vocab: super::shakespeare::VOCAB_SIZE,
                },
                sample_shape: vec![super::shakespeare::SEQ_LEN],
                target: Target::Classes {
                    classes: super::shakespeare::VOCAB_SIZE,
                },
            },
            DatasetKind::Movielens100k | DatasetKind::Movielens100kRandom => DataSpec {
                input: Input::Ids {
                    cardinalities: vec![
                        super::movielens::ML100K_USERS,
                        super::movielens::ML100K_ITEMS,
                    ],
                },
                sample_shape: vec![2],
                target: Target::Real {
                    min: super::movielens::RATING_MIN,
                    max: super::movielens::RATING_MAX,
                },
            },
        }
    }

    /// Per-channel mean of pixel values scaled to `[0, 1]` over the training set (the values FedML
    /// and torchvision examples normalize with).
    pub fn mean(self) -> &'static [f32] {
        match self {
            DatasetKind::Mnist => &[0.1307],
            DatasetKind::FashionMnist => &[0.2860],
            DatasetKind::Cifar10 => &[0.491_399_7, 0.482_158_27, 0.446_531_24],
            _ => &[],
        }
    }

    /// Per-channel standard deviation matching [`DatasetKind::mean`].
    pub fn std(self) -> &'static [f32] {
        match self {
            DatasetKind::Mnist => &[0.3081],
            DatasetKind::FashionMnist => &[0.3530],
            DatasetKind::Cifar10 => &[0.247_032_33, 0.243_485_05, 0.261_587_68],
            _ => &[],
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = Error;

    /// Accepts FedML's names, case-insensitively: `mnist`, `fashion_mnist` / `fashion-mnist` /
    /// `fmnist`, `cifar10`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mnist" => Ok(DatasetKind::Mnist),
            "fashion_mnist" | "fashion-mnist" | "fashionmnist" | "fmnist" => {
                Ok(DatasetKind::FashionMnist)
            }
            "cifar10" | "cifar-10" | "cifar_10" => Ok(DatasetKind::Cifar10),
            "shakespeare" => Ok(DatasetKind::Shakespeare),
            "movielens_100k" | "movielens-100k" | "movielens" | "ml-100k" | "ml_100k" => {
                Ok(DatasetKind::Movielens100k)
            }
            "movielens_100k_random" | "movielens-100k-random" => {
                Ok(DatasetKind::Movielens100kRandom)
            }
            _ => Err(Error::UnknownDataset {
                name: s.to_string(),
                valid: VALID_NAMES,
            }),
        }
    }
}

/// The per-user cache directory for data sets: `<user cache dir>/fedmq/data` (e.g.
/// `~/.cache/fedmq/data` on Linux), or `./data` when the platform has no cache directory.
pub fn default_cache_dir() -> PathBuf {
    match dirs::cache_dir() {
        Some(dir) => dir.join("fedmq").join("data"),
        None => PathBuf::from("data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_fedml_names() {
        assert_eq!(
            "mnist".parse::<DatasetKind>().ok(),
            Some(DatasetKind::Mnist)
        );
        for n in ["fashion_mnist", "fashion-mnist", "fmnist", "FMNIST"] {
            assert_eq!(
                n.parse::<DatasetKind>().ok(),
                Some(DatasetKind::FashionMnist)
            );
        }
        assert_eq!(
            "cifar10".parse::<DatasetKind>().ok(),
            Some(DatasetKind::Cifar10)
        );
        for k in DatasetKind::ALL {
            assert_eq!(k.name().parse::<DatasetKind>().ok(), Some(k));
            // serde (config files, JSON reports) spells every set as its name.
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<DatasetKind>(&json).unwrap(), k);
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = "cifar100".parse::<DatasetKind>().unwrap_err();
        assert!(matches!(err, Error::UnknownDataset { .. }));
        let msg = err.to_string();
        assert!(msg.contains("cifar100") && msg.contains("fashion_mnist") && msg.contains("mnist"));
    }

    #[test]
    fn serde_accepts_aliases() {
        let k: DatasetKind = serde_json::from_str("\"fashion-mnist\"").unwrap();
        assert_eq!(k, DatasetKind::FashionMnist);
        assert_eq!(serde_json::to_string(&k).unwrap(), "\"fashion_mnist\"");
    }

    #[test]
    fn cache_dir_ends_in_fedmq_data() {
        let d = default_cache_dir();
        assert!(d.ends_with("fedmq/data") || d == Path::new("data"));
    }
}
