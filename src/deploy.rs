//! What a participant started by an orchestrator needs to find out about itself: its rank (a
//! device) or site (an edge) without hand editing (`--rank auto`, `--site auto`).
//!
//! In order:
//! 1. an environment variable (`FEDMQ_RANK`, `FEDMQ_SITE`), when set;
//! 2. a claim in a directory the replicas share (`FEDMQ_RANK_DIR`, a docker-compose volume):
//!    the lowest free number, taken by creating `<dir>/<kind>-<n>` exclusively with the
//!    host name in it, so a restarted container with the same host name keeps its number;
//! 3. the host name's ordinal: `<name>-<i>` (a Kubernetes StatefulSet pod) is number `i + 1`.

use anyhow::{bail, Context, Result};
use std::io::Write as _;
use std::path::Path;

/// Which number is derived: a device's rank or an edge's site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordinal {
    /// A device's rank (`--rank auto`, `FEDMQ_RANK`, claims `rank-<n>`).
    Rank,
    /// An edge's site (`--site auto`, `FEDMQ_SITE`, claims `site-<n>`).
    Site,
}

impl Ordinal {
    fn env(self) -> &'static str {
        match self {
            Ordinal::Rank => "FEDMQ_RANK",
            Ordinal::Site => "FEDMQ_SITE",
        }
    }

    fn word(self) -> &'static str {
        match self {
            Ordinal::Rank => "rank",
            Ordinal::Site => "site",
        }
    }
}

/// The environment [`derive`] reads, passed in so that tests need no process environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `FEDMQ_RANK` or `FEDMQ_SITE`.
    pub explicit: Option<String>,
    /// `FEDMQ_RANK_DIR`.
    pub claim_dir: Option<String>,
    /// The host name.
    pub hostname: Option<String>,
}

impl Environment {
    /// This process's environment for `kind`.
    pub fn current(kind: Ordinal) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let hostname = var("HOSTNAME").or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        });
        Self {
            explicit: var(kind.env()),
            claim_dir: var("FEDMQ_RANK_DIR"),
            hostname,
        }
    }
}

/// The number (1..=`max`) of this participant, from `env` as the module docs say.
///
/// # Errors
/// Nothing to derive it from, a value out of range, a claim directory that cannot be written
/// or whose numbers are all taken; each names the setting to fix.
pub fn derive(kind: Ordinal, max: usize, env: &Environment) -> Result<usize> {
    let word = kind.word();
    let in_range = |n: usize, from: &str| {
        if (1..=max).contains(&n) {
            Ok(n)
        } else {
            bail!("{from} gives {word} {n}, outside 1..={max}")
        }
    };
    if let Some(v) = &env.explicit {
        let n = v
            .trim()
            .parse::<usize>()
            .with_context(|| format!("{} is {v:?}: not a {word} number", kind.env()))?;
        return in_range(n, kind.env());
    }
    if let Some(dir) = &env.claim_dir {
        return claim(
            Path::new(dir),
            kind,
            max,
            env.hostname.as_deref().unwrap_or(""),
        );
    }
    if let Some(h) = &env.hostname {
        if let Some((name, i)) = h.rsplit_once('-') {
            if !name.is_empty() && !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) {
                let i: usize = i.parse().context("host name ordinal")?;
                return in_range(i + 1, &format!("host name {h:?}"));
            }
        }
    }
    bail!(
        "--{word} auto: nothing to derive the {word} from: set {} (a number), or FEDMQ_RANK_DIR \
         (a directory the replicas share), or run where the host name ends in -<ordinal> (a \
         Kubernetes StatefulSet); or pass --{word} <N>",
        kind.env()
    )
}

/// Takes the lowest free number in `dir` for `host` (or the one `host` took before).
fn claim(dir: &Path, kind: Ordinal, max: usize, host: &str) -> Result<usize> {
    let word = kind.word();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("FEDMQ_RANK_DIR {}: cannot create it", dir.display()))?;
    // A number this host claimed before (a restarted container).
    if !host.is_empty() {
        for n in 1..=max {
            let p = dir.join(format!("{word}-{n}"));
            if std::fs::read_to_string(&p).is_ok_and(|h| h.trim() == host) {
                return Ok(n);
            }
        }
    }
    for n in 1..=max {
        let p = dir.join(format!("{word}-{n}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(mut f) => {
                f.write_all(format!("{host}\n").as_bytes())
                    .with_context(|| format!("writing the claim {}", p.display()))?;
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "FEDMQ_RANK_DIR: cannot claim {} (is it writable?)",
                        p.display()
                    )
                })
            }
        }
    }
    bail!(
        "FEDMQ_RANK_DIR {}: all {max} {word}s are claimed; start no more replicas than that \
         (train_args.{}), or delete the claims of replicas that are gone",
        dir.display(),
        match kind {
            Ordinal::Rank => "client_num_in_total",
            Ordinal::Site => "group_num",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(explicit: Option<&str>, dir: Option<&Path>, host: Option<&str>) -> Environment {
        Environment {
            explicit: explicit.map(str::to_string),
            claim_dir: dir.map(|d| d.display().to_string()),
            hostname: host.map(str::to_string),
        }
    }

    #[test]
    fn the_variable_wins_and_is_checked() {
        let e = env(Some("3"), None, Some("fedmq-client-7"));
        assert_eq!(derive(Ordinal::Rank, 10, &e).unwrap(), 3);
        let e = env(Some("11"), None, None);
        let err = derive(Ordinal::Rank, 10, &e).unwrap_err().to_string();
        assert!(
            err.contains("FEDMQ_RANK") && err.contains("1..=10"),
            "{err}"
        );
        let err = derive(Ordinal::Site, 4, &env(Some("x"), None, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FEDMQ_SITE"), "{err}");
    }

    #[test]
    fn a_statefulset_pod_takes_its_ordinal_plus_one() {
        let e = env(None, None, Some("fedmq-client-0"));
        assert_eq!(derive(Ordinal::Rank, 10, &e).unwrap(), 1);
        let e = env(None, None, Some("fedmq-edge-9"));
        assert_eq!(derive(Ordinal::Site, 10, &e).unwrap(), 10);
        let err = derive(Ordinal::Site, 9, &e).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        let err = derive(Ordinal::Rank, 10, &env(None, None, Some("a1b2c3d4e5f6")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FEDMQ_RANK_DIR") && err.contains("--rank"),
            "{err}"
        );
    }

    #[test]
    fn replicas_claim_distinct_numbers_and_keep_them_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let d = Some(dir.path());
        let take = |host: &str| derive(Ordinal::Rank, 3, &env(None, d, Some(host)));
        assert_eq!(take("c0ffee000001").unwrap(), 1);
        assert_eq!(take("c0ffee000002").unwrap(), 2);
        assert_eq!(
            take("c0ffee000001").unwrap(),
            1,
            "a restart keeps its claim"
        );
        assert_eq!(take("c0ffee000003").unwrap(), 3);
        let err = take("c0ffee000004").unwrap_err().to_string();
        assert!(err.contains("all 3 ranks are claimed"), "{err}");
        // Sites claim apart from ranks.
        let site = derive(Ordinal::Site, 2, &env(None, d, Some("c0ffee000001"))).unwrap();
        assert_eq!(site, 1);
    }

    #[test]
    fn concurrent_claims_never_share_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let got: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|i| {
                    let p = path.clone();
                    s.spawn(move || {
                        derive(
                            Ordinal::Rank,
                            16,
                            &env(None, Some(&p), Some(&format!("h{i}"))),
                        )
                        .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=16).collect::<Vec<_>>(), "{got:?}");
    }
}
