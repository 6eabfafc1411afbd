//! `fedmq bench robustness`: every attack against every defense. Each cell of the matrix is a
//! whole local federation (`federation::run_local`: embedded broker and store, real training,
//! the attackers ordinary clients with `attack_args` set), from one base config with
//! `attack_args` and `defense_args` set per cell. The results (final accuracy, backdoor success,
//! rounds) are written as JSON, a Markdown table per number of attackers, and a heat map.

use crate::config::Config;
use crate::federation::{self, LocalOptions};
use crate::metrics::RoundRecord;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The attacks of the default matrix, as `attack_type[:attack_mode]`.
pub const ATTACKS: &[&str] = &[
    "byzantine:zero",
    "byzantine:random",
    "byzantine:flip",
    "byzantine:scale",
    "label_flipping",
    "model_replacement",
    "norm_constrained_backdoor",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct RobustnessBench {
    /// The base config (data set, model, clients, local training, rounds); its `attack_args`
    /// and `defense_args` are replaced per cell, other attack and defense settings kept.
    pub base: Config,
    /// Attacks, as `attack_type[:attack_mode]`; the clean run is added.
    pub attacks: Vec<String>,
    /// Defenses (`defense_type` names, `none` for plain aggregation).
    pub defenses: Vec<String>,
    /// Numbers of attacking clients.
    pub malicious: Vec<usize>,
    /// Where each run's metrics and the summary files go.
    pub out: PathBuf,
}

/// One cell: an attack with some attackers against a defense.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Cell {
    /// `none` for the clean run, else `attack_type[:attack_mode]`.
    pub attack: String,
    /// Attacking clients (0 for the clean run).
    pub malicious: usize,
    /// The defense, or `none`.
    pub defense: String,
    /// Test accuracy after the last round.
    pub final_accuracy: Option<f64>,
    /// Best test accuracy of any round.
    pub best_accuracy: Option<f64>,
    /// Backdoor success after the last round (backdoor attacks only).
    pub backdoor_success: Option<f64>,
    /// Rounds closed.
    pub rounds: usize,
    /// Wall seconds of the run.
    pub wall_s: f64,
    /// `completed`, `aborted: ...` or `stopped: ...`.
    pub outcome: String,
}

impl Cell {
    fn from_records(
        attack: &str,
        malicious: usize,
        defense: &str,
        records: &[RoundRecord],
        wall_s: f64,
        outcome: String,
    ) -> Self {
        let evaluated: Vec<&RoundRecord> = records
            .iter()
            .filter(|r| r.test_accuracy.is_some_and(f64::is_finite))
            .collect();
        Self {
            attack: attack.to_string(),
            malicious,
            defense: defense.to_string(),
            final_accuracy: evaluated.last().and_then(|r| r.test_accuracy),
            best_accuracy: evaluated
                .iter()
                .filter_map(|r| r.test_accuracy)
                .reduce(f64::max),
            backdoor_success: evaluated
                .last()
                .and_then(|r| r.strategy.get("backdoor_success").copied()),
            rounds: records.len(),
            wall_s,
            outcome,
        }
    }
}

/// The config of one cell.
///
/// # Errors
/// An attack that is not `attack_type[:attack_mode]`.
pub fn cell_config(base: &Config, attack: &str, malicious: usize, defense: &str) -> Result<Config> {
    let mut c = base.clone();
    c.attack_args.enable_attack = attack != "none";
    if c.attack_args.enable_attack {
        let (kind, mode) = attack.split_once(':').unwrap_or((attack, ""));
        c.attack_args.attack_type = kind.to_string();
        if !mode.is_empty() {
            c.attack_args.attack_mode = mode.to_string();
        }
        c.attack_args.byzantine_client_num = malicious;
        c.attack_args.malicious_client_id = None;
        if kind == "label_flipping" && c.attack_args.original_class_list.is_empty() {
            // Every class shifted by one: the attacker's whole data set mislabelled.
            let n = base
                .data_args
                .dataset
                .parse::<crate::data::DatasetKind>()
                .map_or(10, |k| k.num_classes()) as u32;
            c.attack_args.original_class_list = (0..n).collect();
            c.attack_args.target_class_list = (0..n).map(|i| (i + 1) % n).collect();
        }
    }
    c.defense_args.enable_defense = defense != "none";
    if c.defense_args.enable_defense {
        c.defense_args.defense_type = defense.to_string();
        if c.defense_args.byzantine_client_num == 0 {
            c.defense_args.byzantine_client_num = malicious.max(1);
        }
        if defense == "fltrust" && c.defense_args.root_data_size == 0 {
            c.defense_args.root_data_size = 100;
        }
    }
    c.validation_args.frequency_of_the_test = 1;
    c.common_args.run_id = format!("{attack}-{malicious}-{defense}")
        .replace(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-'), "-");
    c.validate()
        .with_context(|| format!("{attack} with {malicious} attackers against {defense}"))?;
    Ok(c)
}

/// Runs the matrix: the clean run against every defense, then each attack with each number of
/// attackers against every defense. Prints one JSON line per cell as it finishes, and writes
/// `robustness.json`, `robustness.md` and `robustness.svg` to `bench.out`.
///
/// # Errors
/// A cell whose config does not validate (before anything runs), or a run that cannot start.
pub async fn run(bench: &RobustnessBench, cancel: CancellationToken) -> Result<Vec<Cell>> {
    let mut plans = Vec::new();
    for d in &bench.defenses {
        plans.push(("none".to_string(), 0, d.clone()));
    }
    for &k in &bench.malicious {
        for a in &bench.attacks {
            for d in &bench.defenses {
                plans.push((a.clone(), k, d.clone()));
            }
        }
    }
    let configs = plans
        .iter()
        .map(|(a, k, d)| cell_config(&bench.base, a, *k, d))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&bench.out)
        .with_context(|| format!("creating {}", bench.out.display()))?;
    let mut cells = Vec::new();
    for ((a, k, d), c) in plans.into_iter().zip(configs) {
        if cancel.is_cancelled() {
            break;
        }
        let opts = LocalOptions::new(bench.out.join(&c.common_args.run_id));
        let started = std::time::Instant::now();
        let report = federation::run_local(&c, &opts, |_| {}, cancel.clone())
            .await
            .with_context(|| format!("{a} with {k} attackers against {d}"))?;
        let outcome = report.server.outcome.summary();
        let cell = Cell::from_records(
            &a,
            k,
            &d,
            &report.server.records,
            started.elapsed().as_secs_f64(),
            outcome,
        );
        println!("{}", serde_json::to_string(&cell)?);
        cells.push(cell);
        // Partial results survive an interrupted matrix.
        write_outputs(bench, &cells)?;
    }
    Ok(cells)
}

/// The cells of earlier `robustness.json` files, merged: a cell of a later file replaces the
/// same (attack, attackers, defense) of an earlier one (a rerun of some defenses), in the order
/// the cells first appeared.
///
/// # Errors
/// A file that cannot be read or is not a list of cells.
pub fn merge(files: &[PathBuf]) -> Result<Vec<Cell>> {
    let mut cells: Vec<Cell> = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let more: Vec<Cell> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a robustness.json list of cells", f.display()))?;
        for c in more {
            match cells.iter_mut().find(|o| {
                o.attack == c.attack && o.malicious == c.malicious && o.defense == c.defense
            }) {
                Some(old) => *old = c,
                None => cells.push(c),
            }
        }
    }
    Ok(cells)
}

/// Writes `robustness.json`, `robustness.md` and `robustness.svg`.
///
/// # Errors
/// A file that cannot be written.
pub fn write_outputs(bench: &RobustnessBench, cells: &[Cell]) -> Result<()> {
    let write = |name: &str, text: String| -> Result<()> {
        let path = bench.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write(
        "robustness.json",
        serde_json::to_string_pretty(cells)? + "\n",
    )?;
    write("robustness.md", markdown(cells))?;
    let title = format!(
        "{} {} — {} clients — final accuracy / backdoor success",
        bench.base.data_args.dataset,
        bench.base.model_args.model,
        bench.base.train_args.client_num_in_total
    );
    write("robustness.svg", heat_map(cells, &title) + "\n")?;
    Ok(())
}

fn ordered<'a>(cells: &'a [Cell], key: impl Fn(&'a Cell) -> &'a str) -> Vec<&'a str> {
    let mut v: Vec<&str> = Vec::new();
    for c in cells {
        let k = key(c);
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v
}

/// The numbers of attackers in `cells` (0 alone when there are only clean runs), ascending.
fn attacker_counts(cells: &[Cell]) -> Vec<usize> {
    let mut counts: Vec<usize> = cells
        .iter()
        .filter(|c| c.attack != "none")
        .map(|c| c.malicious)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    if counts.is_empty() {
        counts.push(0);
    }
    counts
}

/// The cell of `attack` against `defense` with `k` attackers (the clean run for `none`).
fn cell_of<'a>(cells: &'a [Cell], attack: &str, defense: &str, k: usize) -> Option<&'a Cell> {
    cells.iter().find(|c| {
        c.attack == attack
            && c.defense == defense
            && (c.malicious == k || (c.attack == "none" && c.malicious == 0))
    })
}

fn pct(a: Option<f64>) -> String {
    a.map_or("—".into(), |a| format!("{:.1}", a * 100.0))
}

/// The clean run's final accuracy without a defense, the reference of the targets.
fn clean_accuracy(cells: &[Cell]) -> Option<f64> {
    cells
        .iter()
        .find(|c| c.attack == "none" && c.defense == "none")
        .and_then(|c| c.final_accuracy)
}

/// Whether `c` meets the target: accuracy within 2 points of the clean run, backdoor success
/// below 5%.
pub fn holds(c: &Cell, clean: f64) -> bool {
    c.final_accuracy.is_some_and(|a| a >= clean - 0.02)
        && c.backdoor_success.is_none_or(|b| b < 0.05)
}

/// Whether the attack in `c` hurts without a defense: accuracy down 10 points or more from the
/// clean run, or backdoor success of 50% or more.
pub fn hurts(c: &Cell, clean: f64) -> bool {
    c.final_accuracy.is_some_and(|a| a <= clean - 0.10)
        || c.backdoor_success.is_some_and(|b| b >= 0.5)
}

/// One table per number of attackers: a row per attack, a column per defense, each cell
/// `accuracy% (backdoor%)`; then, per attack, whether it hurts undefended and which defenses
/// meet the target.
pub fn markdown(cells: &[Cell]) -> String {
    let defenses = ordered(cells, |c| &c.defense);
    let attacks = ordered(cells, |c| &c.attack);
    let counts = attacker_counts(cells);
    let clean = clean_accuracy(cells);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Final test accuracy in % (backdoor success in %, backdoor attacks only). Clean run \
         without a defense: {}%.\n",
        pct(clean)
    );
    for &k in &counts {
        let _ = writeln!(t, "**{k} attacking clients**\n");
        t.push_str("| attack |");
        for d in &defenses {
            let _ = write!(t, " {d} |");
        }
        t.push_str("\n|---|");
        for _ in &defenses {
            t.push_str("---:|");
        }
        t.push('\n');
        for a in &attacks {
            let _ = write!(t, "| {a} |");
            for d in &defenses {
                let cell = cell_of(cells, a, d, k);
                match cell {
                    Some(c) => {
                        let bd = c
                            .backdoor_success
                            .map(|b| format!(" ({})", pct(Some(b))))
                            .unwrap_or_default();
                        let mark = match clean {
                            Some(cl) if c.attack != "none" && holds(c, cl) => " ✓",
                            _ => "",
                        };
                        let _ = write!(t, " {}{bd}{mark} |", pct(c.final_accuracy));
                    }
                    None => t.push_str(" — |"),
                }
            }
            t.push('\n');
        }
        t.push('\n');
        if let Some(cl) = clean {
            for a in attacks.iter().filter(|a| **a != "none") {
                let row: Vec<&Cell> = cells
                    .iter()
                    .filter(|c| c.attack == *a && c.malicious == k)
                    .collect();
                let undefended = row.iter().find(|c| c.defense == "none");
                let good: Vec<&str> = row
                    .iter()
                    .filter(|c| c.defense != "none" && holds(c, cl))
                    .map(|c| c.defense.as_str())
                    .collect();
                let _ = writeln!(
                    t,
                    "- {a}: undefended {}; target met by {}",
                    match undefended {
                        Some(c) if hurts(c, cl) => "hurts (real attack)",
                        Some(_) => "does NOT hurt by 10 points / 50% backdoor",
                        None => "not run",
                    },
                    if good.is_empty() {
                        "no defense".to_string()
                    } else {
                        good.join(", ")
                    }
                );
            }
            t.push('\n');
        }
    }
    t
}

/// A heat map per number of attackers: rows attacks, columns defenses, each cell coloured by
/// final accuracy (red low, green high) and labelled with it, and with the backdoor success
/// where there is one. Hand-written SVG.
pub fn heat_map(cells: &[Cell], title: &str) -> String {
    let defenses = ordered(cells, |c| &c.defense);
    let attacks = ordered(cells, |c| &c.attack);
    let counts = attacker_counts(cells);
    let (cw, ch, left, top) = (78.0, 34.0, 190.0, 60.0);
    let panel_h = top + ch * attacks.len() as f64 + 30.0;
    let width = left + cw * defenses.len() as f64 + 20.0;
    let height = 30.0 + panel_h * counts.len() as f64;
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">{}</text>"#,
        esc(title)
    );
    for (p, &k) in counts.iter().enumerate() {
        let y0 = 30.0 + panel_h * p as f64;
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.0}" font-size="13">{k} attacking clients</text>"#,
            y0 + 18.0
        );
        for (j, d) in defenses.iter().enumerate() {
            let x = left + cw * j as f64 + cw / 2.0;
            let _ = writeln!(
                svg,
                r#"<text x="{x:.0}" y="{:.0}" text-anchor="middle">{}</text>"#,
                y0 + top - 8.0,
                esc(d)
            );
        }
        for (i, a) in attacks.iter().enumerate() {
            let y = y0 + top + ch * i as f64;
            let _ = writeln!(
                svg,
                r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + ch / 2.0 + 4.0,
                esc(a)
            );
            for (j, d) in defenses.iter().enumerate() {
                let cell = cell_of(cells, a, d, k);
                let x = left + cw * j as f64;
                let (fill, label) = match cell.and_then(|c| c.final_accuracy.map(|a| (c, a))) {
                    Some((c, acc)) => {
                        // Hue 0 (red) at 50% accuracy or less, 120 (green) at 100%.
                        let hue = ((acc - 0.5) / 0.5).clamp(0.0, 1.0) * 120.0;
                        let bd = c
                            .backdoor_success
                            .map(|b| format!(" / {:.0}", b * 100.0))
                            .unwrap_or_default();
                        (
                            format!("hsl({hue:.0},70%,75%)"),
                            format!("{:.1}{bd}", acc * 100.0),
                        )
                    }
                    None => ("#eeeeee".to_string(), "—".to_string()),
                };
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.0}" y="{y:.0}" width="{:.0}" height="{:.0}" fill="{fill}" stroke="white"/><text x="{:.0}" y="{:.0}" text-anchor="middle">{label}</text>"#,
                    cw,
                    ch,
                    x + cw / 2.0,
                    y + ch / 2.0 + 4.0
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(attack: &str, k: usize, defense: &str, acc: f64, bd: Option<f64>) -> Cell {
        Cell {
            attack: attack.into(),
            malicious: k,
            defense: defense.into(),
            final_accuracy: Some(acc),
            best_accuracy: Some(acc),
            backdoor_success: bd,
            rounds: 10,
            wall_s: 1.0,
            outcome: "completed".into(),
        }
    }

    #[test]
    fn targets_read_the_clean_run() {
        let clean = 0.90;
        assert!(holds(&cell("a", 2, "median", 0.885, None), clean));
        assert!(!holds(&cell("a", 2, "median", 0.87, None), clean));
        assert!(!holds(&cell("a", 2, "median", 0.90, Some(0.06)), clean));
        assert!(hurts(&cell("a", 2, "none", 0.80, None), clean));
        assert!(hurts(&cell("a", 2, "none", 0.90, Some(0.5)), clean));
        assert!(!hurts(&cell("a", 2, "none", 0.85, Some(0.1)), clean));
    }

    #[test]
    fn table_and_heat_map_have_a_cell_per_run() {
        let cells = vec![
            cell("none", 0, "none", 0.90, None),
            cell("none", 0, "krum", 0.89, None),
            cell("byzantine:random", 2, "none", 0.10, None),
            cell("byzantine:random", 2, "krum", 0.89, None),
            cell("model_replacement", 2, "none", 0.90, Some(0.99)),
            cell("model_replacement", 2, "krum", 0.89, Some(0.01)),
        ];
        let md = markdown(&cells);
        assert!(md.contains("| byzantine:random | 10.0 | 89.0 ✓ |"), "{md}");
        assert!(
            md.contains("| model_replacement | 90.0 (99.0) | 89.0 (1.0) ✓ |"),
            "{md}"
        );
        assert!(
            md.contains("- byzantine:random: undefended hurts (real attack); target met by krum")
        );
        let svg = heat_map(&cells, "t <x>");
        assert_eq!(svg.matches("<rect x=").count(), 6, "{svg}");
        assert!(svg.contains("t &lt;x&gt;") && svg.contains("90.0 / 99"));
    }

    #[test]
    fn merged_files_take_the_later_cell() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        let first = vec![
            cell("none", 0, "none", 0.9, None),
            cell("none", 0, "fltrust", 0.7, None),
        ];
        std::fs::write(&a, serde_json::to_string(&first).unwrap()).unwrap();
        std::fs::write(
            &b,
            serde_json::to_string(&[cell("none", 0, "fltrust", 0.95, None)]).unwrap(),
        )
        .unwrap();
        let m = merge(&[a, b]).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].final_accuracy, Some(0.95));
        assert!(merge(&[dir.path().join("missing.json")]).is_err());
    }

    #[test]
    fn a_cell_config_sets_the_attack_and_defense() {
        let base = Config::from_yaml_str(
            "data_args:\n  dataset: mnist\ntrain_args:\n  client_num_in_total: 10\n  \
             client_num_per_round: 10\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let c = cell_config(&base, "byzantine:flip", 3, "krum").unwrap();
        assert!(c.attack_args.enable_attack && c.defense_args.enable_defense);
        assert_eq!(c.attack_args.attack_mode, "flip");
        assert_eq!(c.defense_args.byzantine_client_num, 3);
        let l = cell_config(&base, "label_flipping", 2, "fltrust").unwrap();
        assert_eq!(l.attack_args.target_class_list[9], 0);
        assert_eq!(l.defense_args.root_data_size, 100);
        let clean = cell_config(&base, "none", 0, "none").unwrap();
        assert!(!clean.attack_args.enable_attack && !clean.defense_args.enable_defense);
        assert!(cell_config(&base, "byzantine:bogus", 2, "none").is_err());
    }
}
