//! [`Error`]: everything that can go wrong while fetching, parsing, loading or partitioning data.
//!
//! Every message names the thing at fault (a file path, a package, a tool) and says what to do.

use std::path::PathBuf;

/// Result of the data module.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the data module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === I/O ===
    /// Reading, writing or renaming a file failed.
    #[error("cannot {action} {}: {source}; check that the path exists, is accessible and the disk is not full", path.display())]
    Io {
        /// What was attempted (`read`, `create`, `rename` …).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    // === File formats ===
    /// A file is shorter than its header says.
    #[error("{}: truncated: expected {expected} bytes, got {got}; the file is incomplete, delete it and fetch it again", path.display())]
    Truncated {
        /// The file (or the name given to the bytes).
        path: PathBuf,
        /// Length the header implies.
        expected: u64,
        /// Actual length.
        got: u64,
    },
    /// A file is longer than its header says.
    #[error("{}: {} unexpected trailing bytes (expected {expected} bytes, got {got}); the file is corrupt or not in this format, delete it and fetch it again", path.display(), got.saturating_sub(*expected))]
    TrailingBytes {
        /// The file (or the name given to the bytes).
        path: PathBuf,
        /// Length the header implies.
        expected: u64,
        /// Actual length.
        got: u64,
    },
    /// The first four bytes are not an IDX magic number.
    #[error("{}: bad magic number {found:02x?}, not an IDX file (expected 00 00 08 <ndims>); check that this is the right file, or delete it and fetch it again", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes found (fewer than four when the file is that short).
        found: Vec<u8>,
    },
    /// An IDX file whose element type is not unsigned byte.
    #[error("{}: unsupported IDX element type 0x{dtype:02x} ({}); fedmq reads only unsigned-byte (0x08) IDX files such as MNIST's", path.display(), idx_type_name(*dtype))]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The type byte found.
        dtype: u8,
    },
    /// An IDX file with the wrong number of dimensions for its role.
    #[error("{}: expected a {expected}-dimensional IDX file of {what}, found {found} dimensions; check that the images and labels files are not swapped", path.display())]
    BadDims {
        /// The file.
        path: PathBuf,
        /// `images` or `labels`.
        what: &'static str,
        /// Dimensions expected.
        expected: usize,
        /// Dimensions found.
        found: usize,
    },
    /// Images and labels of one split disagree on the number of samples.
    #[error("{} holds {n_images} images but {} holds {n_labels} labels; use the images and labels files of the same split", images.display(), labels.display())]
    CountMismatch {
        /// The images file.
        images: PathBuf,
        /// The labels file.
        labels: PathBuf,
        /// Number of images.
        n_images: usize,
        /// Number of labels.
        n_labels: usize,
    },
    /// A label is not below the number of classes.
    #[error("{}: label {label} of sample {index} is out of range for {num_classes} classes; the file is corrupt or belongs to another data set", path.display())]
    LabelOutOfRange {
        /// The file (or data set name).
        path: PathBuf,
        /// Sample index.
        index: usize,
        /// The label found.
        label: u32,
        /// Number of classes of the data set.
        num_classes: usize,
    },
    /// A CIFAR-10 batch whose length is not a whole number of records.
    #[error("{}: {len} bytes is not a whole, non-zero number of {record}-byte CIFAR-10 records; the file is truncated or not a CIFAR-10 binary batch, download it again", path.display())]
    BadRecordSize {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Record size (1 label byte + 3072 pixel bytes).
        record: usize,
    },
    /// In-memory data given to a constructor is inconsistent.
    #[error("data set {name}: {reason}")]
    InvalidDataset {
        /// Data set name.
        name: String,
        /// What is inconsistent.
        reason: String,
    },

    // === Fetching ===
    /// A file's SHA-256 differs from the pinned one.
    #[error("checksum mismatch for {}: expected SHA-256 {expected}, got {got}; the download is corrupt or the package changed, delete it and fetch again (or place the canonical files in the cache by hand)", file.display())]
    ChecksumMismatch {
        /// The file (an archive member is written `archive:member`).
        file: PathBuf,
        /// Pinned SHA-256 (hex).
        expected: String,
        /// Actual SHA-256 (hex).
        got: String,
    },
    /// An external tool the fetcher needs is not on `PATH`.
    #[error("`{tool}` was not found on PATH; {hint}")]
    ToolMissing {
        /// The tool (`npm`, `apt-get`, `dpkg-deb`).
        tool: &'static str,
        /// What installs it, and the manual alternative.
        hint: String,
    },
    /// An external tool ran and failed.
    #[error("`{command}` failed ({status}){}; {hint}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    ToolFailed {
        /// The command line run.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its standard error.
        stderr: String,
        /// What to do.
        hint: String,
    },
    /// A package did not contain a file it should.
    #[error("{}: `{member}` not found in package {package}; the package layout changed, place the files in {} by hand", archive.display(), dir.display())]
    MissingInArchive {
        /// The downloaded archive.
        archive: PathBuf,
        /// The member looked for.
        member: String,
        /// Package name and version.
        package: String,
        /// Where the files belong.
        dir: PathBuf,
    },
    /// Data set files are not in the cache and were not fetched.
    #[error("{dataset}: missing in {}: {}; {hint}", dir.display(), missing.join(", "))]
    MissingFiles {
        /// Data set name.
        dataset: String,
        /// The directory looked in.
        dir: PathBuf,
        /// Missing file names.
        missing: Vec<String>,
        /// What to do.
        hint: String,
    },
    /// The data set has no package source fedmq can fetch.
    #[error("{dataset} cannot be fetched by fedmq (no package carries it); download the CIFAR-10 binary version and place data_batch_1.bin … data_batch_5.bin and test_batch.bin in {}", dir.display())]
    NotFetchable {
        /// Data set name.
        dataset: String,
        /// Where the files belong.
        dir: PathBuf,
    },
    /// A data set name not known to fedmq.
    #[error("unknown data set `{name}`; valid names: {valid}")]
    UnknownDataset {
        /// The name given.
        name: String,
        /// The valid names.
        valid: &'static str,
    },

    /// A line of a text file (play, ratings table) that cannot be parsed.
    #[error("{}:{line}: {reason}; the file is corrupt or not in the expected format, delete it and fetch it again", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0 when the file as a whole is at fault).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A downloaded archive (a wheel) that cannot be read although its SHA-256 matched.
    #[error("{}: cannot read {what}: {reason}; delete it and fetch again, or place the files in {} by hand", archive.display(), dir.display())]
    BadArchive {
        /// The archive.
        archive: PathBuf,
        /// `the zip directory` or `member <name>`.
        what: String,
        /// The zip reader's error.
        reason: String,
        /// Where the files belong.
        dir: PathBuf,
    },

    // === Partitioning ===
    /// `natural` asked of a data set whose samples have no owners.
    #[error(
        "partition_method `natural` needs a data set whose samples have owners (shakespeare: \
         roles, movielens_100k: users); use homo, hetero or pathological for this one"
    )]
    NoOwners,
    /// A partition method name not known to fedmq.
    #[error("unknown partition method `{name}`; valid methods: {valid}")]
    UnknownPartition {
        /// The name given.
        name: String,
        /// The valid names.
        valid: &'static str,
    },
    /// Zero clients requested.
    #[error("cannot partition among 0 clients; set the number of clients to at least 1")]
    NoClients,
    /// A Dirichlet concentration that is not a positive finite number.
    #[error("partition_alpha must be a positive finite number, got {alpha}; use e.g. 0.5 (smaller is more skewed)")]
    InvalidAlpha {
        /// The value given.
        alpha: f64,
    },
    /// Zero shards per client requested.
    #[error(
        "pathological partition needs at least 1 shard per client, got 0; McMahan et al. use 2"
    )]
    NoShards,
    /// More clients (or shards) or a higher minimum than the samples allow.
    #[error("cannot give {num_clients} clients {needed} each ({what}): the data set has only {samples} samples; use fewer clients, fewer shards or a lower minimum")]
    TooFewSamples {
        /// Samples available.
        samples: usize,
        /// Clients requested.
        num_clients: usize,
        /// What each client needs.
        needed: usize,
        /// `samples` (min_samples) or `shards`.
        what: &'static str,
    },
    /// A label vector with a label not below `num_classes`.
    #[error("label {label} of sample {index} is out of range for {num_classes} classes; pass the data set's number of classes")]
    InvalidLabel {
        /// Sample index.
        index: usize,
        /// The label.
        label: u32,
        /// Number of classes given.
        num_classes: usize,
    },
    /// The Dirichlet partition could not satisfy the minimum in the allowed attempts.
    #[error("hetero partition (alpha {alpha}): after {attempts} attempts the smallest client still had {smallest} samples, below min_samples {min_samples}; raise partition_alpha, use fewer clients or lower the minimum")]
    PartitionFailed {
        /// Attempts made.
        attempts: usize,
        /// Smallest client in the last attempt.
        smallest: usize,
        /// Minimum required.
        min_samples: usize,
        /// The Dirichlet concentration.
        alpha: f64,
    },
    /// A partition that does not fit the client's minimum.
    #[error("{method} partition gave client {client} only {got} samples, below min_samples {min_samples}; use fewer clients or shards, or lower the minimum")]
    ClientTooSmall {
        /// Method name.
        method: &'static str,
        /// The client.
        client: usize,
        /// Its samples.
        got: usize,
        /// Minimum required.
        min_samples: usize,
    },
    /// A partition index outside the data set.
    #[error("partition index {index} of client {client} is out of range for {len} samples; use the labels of the set that was partitioned")]
    IndexOutOfRange {
        /// The client.
        client: usize,
        /// The index.
        index: usize,
        /// Number of samples.
        len: usize,
    },
}

/// Human name of an IDX element type byte.
fn idx_type_name(dtype: u8) -> &'static str {
    match dtype {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "i16",
        0x0C => "i32",
        0x0D => "f32",
        0x0E => "f64",
        _ => "unknown type",
    }
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
