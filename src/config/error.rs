//! Configuration errors, and turning YAML errors into messages that point at the fix.

use super::Config;
use serde_yaml_ng::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source} (pass an existing file with -c/--config)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file the config names (`comm_args.mqtt_config_path`, `s3_config_path`) could not be read.
    #[error("{key} names {}, which cannot be read: {source} (paths are relative to the working directory, or to the config file's directory)", path.display())]
    Referenced {
        /// The config key that names the file.
        key: &'static str,
        /// The file (as resolved).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key that does not exist in its section (typo or misplaced key).
    #[error("{0}")]
    UnknownKey(Box<UnknownKey>),
    /// Any other YAML or type error.
    #[error("{}{}: {message}", path.display(), location(*line, *column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// What the parser said.
        message: String,
    },
    /// Values that parse but are not usable; all problems at once.
    #[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid {
        /// One line per problem, each starting with the key.
        problems: Vec<String>,
    },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// Details of [`ConfigError::UnknownKey`].
#[derive(Debug)]
pub struct UnknownKey {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the key.
    pub line: usize,
    /// 1-based column of the key.
    pub column: usize,
    /// Dotted path of the section holding the key (empty for the top level).
    pub section: String,
    /// The key as written.
    pub key: String,
    /// The closest valid key in the same section, when one is close enough.
    pub suggestion: Option<String>,
    /// Dotted path of another section where this exact key is valid.
    pub belongs_in: Option<String>,
    /// Valid keys of the section (for the message when there is no suggestion).
    pub valid: Vec<String>,
    /// The config key that named `path` when it is FedML's separate broker or store file
    /// (`comm_args.mqtt_config_path`, `s3_config_path`); `None` for the config file itself.
    pub named_by: Option<String>,
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let where_ = match (&self.named_by, self.section.is_empty()) {
            (Some(by), _) => format!(
                "in the file {by} names (its keys are those of `{}`)",
                self.section
            ),
            (None, true) => "at the top level".to_string(),
            (None, false) => format!("in section `{}`", self.section),
        };
        write!(
            f,
            "{}:{}:{}: unknown key `{}` {where_}",
            self.path.display(),
            self.line,
            self.column,
            self.key
        )?;
        if let Some(b) = &self.belongs_in {
            write!(
                f,
                "; `{}` belongs in section `{b}`: move it there",
                self.key
            )?;
        } else if let Some(s) = &self.suggestion {
            write!(f, "; did you mean `{s}`?")?;
            // A separate file has few keys and no neighbouring sections to look at: list them.
            if self.named_by.is_some() {
                write!(f, " (valid keys: {})", self.valid.join(", "))?;
            }
        } else {
            write!(f, "; valid keys here: {}", self.valid.join(", "))?;
        }
        Ok(())
    }
}

/// Converts a serde_yaml_ng error into a [`ConfigError`], recognizing unknown keys.
pub(super) fn from_yaml(e: serde_yaml_ng::Error, path: &Path) -> ConfigError {
    from_yaml_in(e, path, "", None)
}

/// As [`from_yaml`] for a file whose top level is section `base` of the configuration (FedML's
/// separate broker and store files, named by config key `named_by`).
pub(super) fn from_yaml_in(
    e: serde_yaml_ng::Error,
    path: &Path,
    base: &str,
    named_by: Option<&str>,
) -> ConfigError {
    let msg = e.to_string();
    let (line, column) = e
        .location()
        .map(|l| (Some(l.line()), Some(l.column())))
        .unwrap_or((None, None));
    if let Some(key) = between(&msg, "unknown field `", "`") {
        // The message starts with the dotted section path when the key is nested:
        // "train_args: unknown field `x`, expected ...".
        let inner = match msg.split_once(": unknown field") {
            Some((s, _)) if !s.contains(' ') => s,
            _ => "",
        };
        let section = match (base, inner) {
            ("", s) | (s, "") => s.to_string(),
            (b, s) => format!("{b}.{s}"),
        };
        let tree = reference_tree();
        let valid = keys_at(&tree, &section);
        // At the top level, FedML's sections count too (`dp_arg` is a typo of `dp_args`).
        let mut candidates = valid.clone();
        if section.is_empty() {
            candidates.extend(super::fedml::SECTIONS.iter().map(|s| s.to_string()));
        }
        let suggestion = closest(&key, &candidates);
        let belongs_in = find_key(&tree, &key, "").filter(|p| *p != section);
        return ConfigError::UnknownKey(Box::new(UnknownKey {
            path: path.to_path_buf(),
            line: line.unwrap_or(0),
            column: column.unwrap_or(0),
            section,
            key,
            suggestion,
            belongs_in,
            valid,
            named_by: named_by.map(String::from),
        }));
    }
    // serde_yaml_ng appends " at line L column C"; we print the location in front instead.
    let message = match msg.rfind(" at line ") {
        Some(i) if line.is_some() => msg[..i].to_string(),
        _ => msg,
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

fn between(s: &str, start: &str, end: &str) -> Option<String> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)?;
    Some(s[i..i + j].to_string())
}

/// The default configuration as a YAML tree: its mappings are exactly the valid sections and keys.
fn reference_tree() -> Value {
    serde_yaml_ng::to_value(Config::default()).unwrap_or(Value::Null)
}

fn keys_at(tree: &Value, dotted: &str) -> Vec<String> {
    let mut node = tree;
    for part in dotted.split('.').filter(|p| !p.is_empty()) {
        match node.get(part) {
            Some(n) => node = n,
            None => return Vec::new(),
        }
    }
    match node {
        Value::Mapping(m) => m
            .keys()
            .filter_map(|k| k.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// Dotted path of the section where `key` is a valid key, searching the whole tree.
fn find_key(tree: &Value, key: &str, prefix: &str) -> Option<String> {
    let Value::Mapping(m) = tree else {
        return None;
    };
    for (k, v) in m {
        let Some(k) = k.as_str() else { continue };
        if k == key && !prefix.is_empty() {
            return Some(prefix.to_string());
        }
        let sub = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        if let Some(p) = find_key(v, key, &sub) {
            return Some(p);
        }
    }
    None
}

/// The closest candidate by edit distance (case-insensitive), if it is plausibly a typo.
pub(super) fn closest(key: &str, candidates: &[String]) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| {
            let d = strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase());
            (d, c)
        })
        .filter(|(d, c)| *d <= (c.len().max(key.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}
