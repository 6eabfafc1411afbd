//! Per-round metrics of a federated run: written as the run goes, plotted and summarized at the end.
//!
//! The server hands one [`RoundRecord`] per closed round to a [`MetricsWriter`], which appends it to
//! two files in the run's metrics directory and flushes them, so a crash loses at most the round
//! being written:
//! - `metrics.jsonl`: one JSON object per line (serde_json of [`RoundRecord`], `None` → `null`);
//!   read it back with [`read_jsonl`].
//! - `metrics.csv`: the same fields as a spreadsheet-friendly table (see [`CSV_HEADER`]).
//!
//! At the end of the run, [`MetricsWriter::finish_plot`] writes `plot.svg` (test accuracy, test and
//! train loss per round; see [`render_plot_svg`]) and [`summary_table`] renders a plain-text table
//! for the terminal.
//!
//! # Layout
//! - `mod.rs`: [`RoundRecord`], [`MetricsWriter`], [`read_jsonl`], [`MetricsError`], CSV rows.
//! - `plot.rs`: [`render_plot_svg`], [`write_plot_svg`] (hand-written SVG, no dependency).
//! - `axis.rs`: linear axes with "nice" bounds and ticks, for the plot.
//! - `table.rs`: [`summary_table`].
//!
//! # Example
//! ```
//! use fedmq::metrics::{read_jsonl, summary_table, MetricsWriter, RoundRecord};
//! let dir = std::env::temp_dir().join(format!("fedmq-metrics-doc-{}", std::process::id()));
//! let mut w = MetricsWriter::create(&dir)?;
//! w.record(&RoundRecord {
//!     round: 1,
//!     test_accuracy: Some(0.9812),
//!     test_loss: Some(0.07),
//!     train_loss: Some(0.11),
//!     round_s: 2.5,
//!     eval_s: Some(0.3),
//!     elapsed_s: 3.0,
//!     bytes: 1 << 20,
//!     participants: 10,
//!     failures: 0,
//!     failed_clients: vec![],
//!     num_samples: 60_000,
//!     retries: 0,
//!     strategy: Default::default(),
//! })?;
//! assert_eq!(read_jsonl(&dir.join("metrics.jsonl"))?, w.records());
//! assert!(summary_table(w.records()).contains("98.12"));
//! let svg = w.finish_plot("MNIST, FedAvg")?;
//! assert!(svg.ends_with("plot.svg"));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), fedmq::metrics::MetricsError>(())
//! ```

mod axis;
mod plot;
mod table;
#[cfg(test)]
mod tests;

pub use plot::{render_curves_svg, render_plot_svg, write_plot_svg, Curve, CurvePanel};
pub use table::{client_eval_line, client_eval_text, summary_table};

use serde::Deserialize;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Name of the JSON-lines file in a metrics directory.
pub const JSONL_FILE: &str = "metrics.jsonl";
/// Name of the CSV file in a metrics directory.
pub const CSV_FILE: &str = "metrics.csv";
/// Name of the plot written by [`MetricsWriter::finish_plot`].
pub const PLOT_FILE: &str = "plot.svg";
/// First line of `metrics.csv`.
pub const CSV_HEADER: &str = "round,test_accuracy,test_loss,train_loss,round_s,eval_s,elapsed_s,\
                              bytes,participants,failures,num_samples,retries,failed_clients";

/// One closed round, as the server saw it.
///
/// Non-finite floats cannot be written as JSON: serde_json writes them as `null`, so an optional
/// value that is NaN reads back as `None`, and a NaN or infinite `round_s`/`elapsed_s` reads back
/// as NaN.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// Round number, as the server counts rounds.
    pub round: u64,
    /// Test accuracy as a fraction in 0..=1; `None` when the model was not evaluated this round.
    pub test_accuracy: Option<f64>,
    /// Test loss; `None` when the model was not evaluated this round.
    pub test_loss: Option<f64>,
    /// Sample-weighted mean training loss over the participants; `None` if no client participated.
    pub train_loss: Option<f64>,
    /// Wall seconds of the round, from the upload of the global model to the round's close.
    #[serde(deserialize_with = "f64_or_nan")]
    pub round_s: f64,
    /// Seconds spent evaluating; `None` when the model was not evaluated this round.
    pub eval_s: Option<f64>,
    /// Seconds since the run started, at the round's close.
    #[serde(deserialize_with = "f64_or_nan")]
    pub elapsed_s: f64,
    /// Bytes moved through the object store in this round (uploads and downloads).
    pub bytes: u64,
    /// Number of clients whose updates were aggregated.
    pub participants: usize,
    /// Number of selected clients that contributed nothing.
    pub failures: usize,
    /// One `"client-3: timeout"` style string per failed client.
    pub failed_clients: Vec<String>,
    /// Training samples behind the aggregated update.
    pub num_samples: u64,
    /// Retries (of transfers or messages) during the round.
    pub retries: u32,
    /// The strategy's own metrics of the round (e.g. `server_update_norm` for FedOpt,
    /// `dp_epsilon`), and the evaluation's measures beyond accuracy (`backdoor_success`); absent
    /// when there are none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub strategy: std::collections::BTreeMap<String, f64>,
}

/// Reads a float that serde_json may have written as `null` (it does so for NaN and ±inf).
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Why metrics could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A file or directory could not be created, written or read.
    #[error(
        "metrics I/O failed on {}: {source} (check that the directory exists or can be created, \
         is writable, and that the disk is not full)",
        path.display()
    )]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of `metrics.jsonl` is not a valid record.
    #[error(
        "{}:{line}: not a metrics record: {reason} (the last line may be cut short if the run \
         crashed while writing it)",
        path.display()
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the JSON parser said.
        reason: String,
    },
}

impl MetricsError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| MetricsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes per-round metrics to `metrics.jsonl` and `metrics.csv` as the run goes.
#[derive(Debug)]
pub struct MetricsWriter {
    dir: PathBuf,
    jsonl_path: PathBuf,
    csv_path: PathBuf,
    jsonl: File,
    csv: File,
    records: Vec<RoundRecord>,
}

impl MetricsWriter {
    /// Creates `dir` (and parents) and the files `metrics.jsonl` and `metrics.csv` in it, truncating
    /// old ones; writes the CSV header.
    pub fn create(dir: &Path) -> Result<Self, MetricsError> {
        std::fs::create_dir_all(dir).map_err(MetricsError::io(dir))?;
        let jsonl_path = dir.join(JSONL_FILE);
        let csv_path = dir.join(CSV_FILE);
        let jsonl = File::create(&jsonl_path).map_err(MetricsError::io(&jsonl_path))?;
        let mut csv = File::create(&csv_path).map_err(MetricsError::io(&csv_path))?;
        write_flushed(&mut csv, format!("{CSV_HEADER}\n").as_bytes())
            .map_err(MetricsError::io(&csv_path))?;
        Ok(MetricsWriter {
            dir: dir.to_path_buf(),
            jsonl_path,
            csv_path,
            jsonl,
            csv,
            records: Vec::new(),
        })
    }

    /// Opens the files of a run resumed after round `up_to`: the records of rounds up to `up_to`
    /// are kept as they are, anything after them (rounds the checkpoint does not cover, a line
    /// cut short by a crash) is cut off, and new rounds are appended. `metrics.csv` is rewritten
    /// from the kept records. Without an earlier `metrics.jsonl` this is [`MetricsWriter::create`].
    pub fn resume(dir: &Path, up_to: u64) -> Result<Self, MetricsError> {
        let jsonl_path = dir.join(JSONL_FILE);
        let text = match std::fs::read(&jsonl_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(dir),
            Err(e) => return Err(MetricsError::io(&jsonl_path)(e)),
        };
        let mut records = Vec::new();
        let mut keep = 0;
        for line in text.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break; // cut short by a crash
            }
            let body = &line[..line.len() - 1];
            if body.iter().all(u8::is_ascii_whitespace) {
                keep += line.len();
                continue;
            }
            match serde_json::from_slice::<RoundRecord>(body) {
                Ok(r)
                    if r.round <= up_to
                        && records
                            .last()
                            .is_none_or(|l: &RoundRecord| l.round < r.round) =>
                {
                    records.push(r);
                    keep += line.len();
                }
                _ => break,
            }
        }
        let jsonl = OpenOptions::new()
            .append(true)
            .open(&jsonl_path)
            .and_then(|f| f.set_len(keep as u64).map(|()| f))
            .map_err(MetricsError::io(&jsonl_path))?;
        let csv_path = dir.join(CSV_FILE);
        let mut csv = File::create(&csv_path).map_err(MetricsError::io(&csv_path))?;
        let mut table = format!("{CSV_HEADER}\n");
        for r in &records {
            table.push_str(&csv_row(r));
        }
        write_flushed(&mut csv, table.as_bytes()).map_err(MetricsError::io(&csv_path))?;
        Ok(MetricsWriter {
            dir: dir.to_path_buf(),
            jsonl_path,
            csv_path,
            jsonl,
            csv,
            records,
        })
    }

    /// Appends one JSON object per line to metrics.jsonl and one row to metrics.csv, flushing both
    /// (a crash loses at most the round being written). Keeps a copy in memory.
    ///
    /// Each line is written with a single write of the whole line. The copy is kept only when both
    /// files were written.
    pub fn record(&mut self, r: &RoundRecord) -> Result<(), MetricsError> {
        // Serializing a struct of plain fields cannot fail; map the error anyway rather than panic.
        let mut line = serde_json::to_string(r).map_err(|e| MetricsError::Io {
            path: self.jsonl_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        line.push('\n');
        write_flushed(&mut self.jsonl, line.as_bytes())
            .map_err(MetricsError::io(&self.jsonl_path))?;
        write_flushed(&mut self.csv, csv_row(r).as_bytes())
            .map_err(MetricsError::io(&self.csv_path))?;
        self.records.push(r.clone());
        Ok(())
    }

    /// The rounds recorded so far, in the order they were recorded.
    pub fn records(&self) -> &[RoundRecord] {
        &self.records
    }

    /// The metrics directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `plot.svg` in the dir (see [`write_plot_svg`]) and returns its path.
    pub fn finish_plot(&self, title: &str) -> Result<PathBuf, MetricsError> {
        let path = self.dir.join(PLOT_FILE);
        write_plot_svg(&self.records, &path, title)?;
        Ok(path)
    }
}

fn write_flushed(f: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    f.write_all(bytes)?;
    f.flush()
}

/// One CSV line (with its newline) for `r`, in the column order of [`CSV_HEADER`].
fn csv_row(r: &RoundRecord) -> String {
    fn opt(v: Option<f64>) -> String {
        v.map(|v| v.to_string()).unwrap_or_default()
    }
    let mut row = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        row,
        "{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.round,
        opt(r.test_accuracy),
        opt(r.test_loss),
        opt(r.train_loss),
        r.round_s,
        opt(r.eval_s),
        r.elapsed_s,
        r.bytes,
        r.participants,
        r.failures,
        r.num_samples,
        r.retries,
        csv_field(&r.failed_clients.join(";")),
    );
    row.push('\n');
    row
}

/// Quotes a CSV field per RFC 4180 when it contains `,` `"` `;` or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', ';', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Reads metrics.jsonl back (for tests and tools); errors name file:line.
///
/// Blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<RoundRecord>, MetricsError> {
    let file = File::open(path).map_err(MetricsError::io(path))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(MetricsError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|e| MetricsError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        records.push(record);
    }
    Ok(records)
}
