//! `fedmq bench strategies`: learning quality of strategies side by side. Each (strategy,
//! partition) pair runs a whole local federation (`federation::run_local`, embedded broker and
//! store, real training) from one base config, evaluating the global model every round; the
//! results are the rounds each needs to reach a target accuracy, its final and best accuracy,
//! and one figure with every accuracy curve.

use crate::config::Config;
use crate::federation::{self, LocalOptions};
use crate::metrics::{render_curves_svg, Curve, CurvePanel, RoundRecord};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// How the clients' data is split (`data_args.partition_method` and `partition_alpha`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Partition {
    /// `homo`, `hetero` or `pathological`.
    pub method: String,
    /// Dirichlet `α` of `hetero`.
    pub alpha: Option<f64>,
}

impl Partition {
    /// Parses `homo`, `pathological` or `hetero:<alpha>`.
    ///
    /// # Errors
    /// Anything else, with the accepted forms.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.split_once(':') {
            Some(("hetero", a)) => match a.parse::<f64>() {
                Ok(alpha) if alpha > 0.0 && alpha.is_finite() => Ok(Self {
                    method: "hetero".into(),
                    alpha: Some(alpha),
                }),
                _ => Err(format!("{s:?}: the Dirichlet alpha must be a number > 0")),
            },
            None if s == "homo" || s == "pathological" => Ok(Self {
                method: s.into(),
                alpha: None,
            }),
            _ => Err(format!(
                "{s:?} is not a partition; use homo, pathological or hetero:<alpha>"
            )),
        }
    }

    /// `hetero α=0.1`, `pathological`, ...
    pub fn label(&self) -> String {
        match self.alpha {
            Some(a) => format!("{} α={a}", self.method),
            None => self.method.clone(),
        }
    }

    fn slug(&self) -> String {
        match self.alpha {
            Some(a) => format!("{}-{a}", self.method).replace('.', "_"),
            None => self.method.clone(),
        }
    }
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct StrategyBench {
    /// The base config (model, data set, clients, local training); strategy, partition and
    /// rounds are set per run.
    pub base: Config,
    /// `train_args.federated_optimizer` names.
    pub strategies: Vec<String>,
    /// Partitions.
    pub partitions: Vec<Partition>,
    /// Rounds per run.
    pub rounds: usize,
    /// Target test accuracy (fraction).
    pub target: f64,
    /// Where each run's metrics and the summary files go.
    pub out: PathBuf,
}

/// One (strategy, partition) run.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRun {
    /// The strategy.
    pub strategy: String,
    /// The partition.
    pub partition: String,
    /// First round whose global model reached the target, if any.
    pub rounds_to_target: Option<u64>,
    /// Test accuracy after the last round.
    pub final_accuracy: Option<f64>,
    /// Best test accuracy of any round.
    pub best_accuracy: Option<f64>,
    /// Rounds closed.
    pub rounds: usize,
    /// Wall seconds of the run.
    pub wall_s: f64,
    /// `completed` or `aborted: ...`.
    pub outcome: String,
    /// (round, test accuracy) of every evaluated round.
    pub accuracy: Vec<(u64, f64)>,
}

impl StrategyRun {
    fn from_records(
        strategy: &str,
        p: &Partition,
        records: &[RoundRecord],
        target: f64,
        wall_s: f64,
        outcome: String,
    ) -> Self {
        let accuracy: Vec<(u64, f64)> = records
            .iter()
            .filter_map(|r| r.test_accuracy.map(|a| (r.round, a)))
            .filter(|(_, a)| a.is_finite())
            .collect();
        Self {
            strategy: strategy.to_string(),
            partition: p.label(),
            rounds_to_target: accuracy.iter().find(|(_, a)| *a >= target).map(|(r, _)| *r),
            final_accuracy: accuracy.last().map(|(_, a)| *a),
            best_accuracy: accuracy.iter().map(|(_, a)| *a).reduce(f64::max),
            rounds: records.len(),
            wall_s,
            outcome,
            accuracy,
        }
    }
}

/// Runs every (strategy, partition) pair in turn, printing each result as a JSON line, and
/// writes `strategies.json`, `strategies.md` and `strategies.svg` to `bench.out`.
///
/// # Errors
/// A strategy or partition the config rejects (checked for all pairs before the first run), a
/// run that cannot start, the output directory.
pub async fn run(bench: &StrategyBench, cancel: CancellationToken) -> Result<Vec<StrategyRun>> {
    let mut plans = Vec::new();
    for p in &bench.partitions {
        for s in &bench.strategies {
            let mut c = bench.base.clone();
            c.train_args.federated_optimizer = s.clone();
            c.data_args.partition_method = p.method.clone();
            if let Some(a) = p.alpha {
                c.data_args.partition_alpha = a;
            }
            c.train_args.comm_round = bench.rounds;
            c.validation_args.frequency_of_the_test = 1;
            c.common_args.run_id = format!("{}-{}", s.to_ascii_lowercase(), p.slug())
                .replace(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-'), "-");
            c.validate()
                .with_context(|| format!("{s} on {}", p.label()))?;
            crate::strategy::from_config(&c.train_args, &c.fedmq_args)
                .map_err(|e| anyhow::anyhow!("{s}: {}: {}", e.key, e.reason))?;
            plans.push((s.clone(), p.clone(), c));
        }
    }
    std::fs::create_dir_all(&bench.out)
        .with_context(|| format!("creating {}", bench.out.display()))?;
    let mut runs = Vec::new();
    for (s, p, c) in plans {
        if cancel.is_cancelled() {
            break;
        }
        let opts = LocalOptions::new(bench.out.join(&c.common_args.run_id));
        let started = std::time::Instant::now();
        let report = federation::run_local(&c, &opts, |_| {}, cancel.clone())
            .await
            .with_context(|| format!("{s} on {}", p.label()))?;
        let outcome = report.server.outcome.summary();
        let run = StrategyRun::from_records(
            &s,
            &p,
            &report.server.records,
            bench.target,
            started.elapsed().as_secs_f64(),
            outcome,
        );
        println!("{}", serde_json::to_string(&run)?);
        runs.push(run);
    }
    write_outputs(bench, &runs)?;
    Ok(runs)
}

/// Writes the JSON, the Markdown table and the figure.
///
/// # Errors
/// A file that cannot be written.
pub fn write_outputs(bench: &StrategyBench, runs: &[StrategyRun]) -> Result<()> {
    let write = |name: &str, text: String| -> Result<()> {
        let path = bench.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write(
        "strategies.json",
        serde_json::to_string_pretty(runs)? + "\n",
    )?;
    write("strategies.md", markdown_table(runs, bench.target))?;
    let title = format!(
        "{} {} — {} clients — test accuracy per round",
        bench.base.data_args.dataset,
        bench.base.model_args.model,
        bench.base.train_args.client_num_in_total
    );
    write("strategies.svg", figure(runs, &title) + "\n")?;
    Ok(())
}

/// The summary table: one row per strategy, two columns (rounds to target, final accuracy) per
/// partition.
pub fn markdown_table(runs: &[StrategyRun], target: f64) -> String {
    let mut partitions: Vec<&str> = Vec::new();
    let mut strategies: Vec<&str> = Vec::new();
    for r in runs {
        if !partitions.contains(&r.partition.as_str()) {
            partitions.push(&r.partition);
        }
        if !strategies.contains(&r.strategy.as_str()) {
            strategies.push(&r.strategy);
        }
    }
    let mut t = String::from("| strategy |");
    for p in &partitions {
        let _ = write!(
            t,
            " {p}: rounds to {:.0}% | {p}: final (best) |",
            target * 100.0
        );
    }
    t.push_str("\n|---|");
    for _ in &partitions {
        t.push_str("---:|---:|");
    }
    t.push('\n');
    for s in &strategies {
        let _ = write!(t, "| {s} |");
        for p in &partitions {
            match runs.iter().find(|r| r.strategy == *s && r.partition == *p) {
                Some(r) => {
                    let reached = match r.rounds_to_target {
                        Some(n) => n.to_string(),
                        None => format!("not in {}", r.rounds),
                    };
                    let pct =
                        |a: Option<f64>| a.map_or("—".into(), |a| format!("{:.2}%", a * 100.0));
                    let _ = write!(
                        t,
                        " {reached} | {} ({}) |",
                        pct(r.final_accuracy),
                        pct(r.best_accuracy)
                    );
                }
                None => t.push_str(" — | — |"),
            }
        }
        t.push('\n');
    }
    t
}

/// One panel per partition, one curve per strategy.
pub fn figure(runs: &[StrategyRun], title: &str) -> String {
    let mut panels: Vec<CurvePanel> = Vec::new();
    for r in runs {
        let curve = Curve {
            label: r.strategy.clone(),
            points: r
                .accuracy
                .iter()
                .map(|&(round, a)| (round as f64, a * 100.0))
                .collect(),
        };
        match panels.iter_mut().find(|p| p.heading == r.partition) {
            Some(p) => p.curves.push(curve),
            None => panels.push(CurvePanel {
                heading: r.partition.clone(),
                curves: vec![curve],
            }),
        }
    }
    render_curves_svg(title, "test accuracy (%)", &panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(strategy: &str, partition: &str, acc: &[f64]) -> StrategyRun {
        let records: Vec<RoundRecord> = acc
            .iter()
            .enumerate()
            .map(|(i, &a)| RoundRecord {
                round: i as u64 + 1,
                test_accuracy: Some(a),
                test_loss: None,
                train_loss: None,
                round_s: 1.0,
                eval_s: None,
                elapsed_s: 1.0,
                bytes: 0,
                participants: 10,
                failures: 0,
                failed_clients: Vec::new(),
                num_samples: 0,
                retries: 0,
                strategy: Default::default(),
            })
            .collect();
        let p = Partition::parse(partition).unwrap();
        StrategyRun::from_records(strategy, &p, &records, 0.97, 1.0, "completed".into())
    }

    #[test]
    fn partitions_parse_or_say_what_is_accepted() {
        assert_eq!(
            Partition::parse("hetero:0.1").unwrap().label(),
            "hetero α=0.1"
        );
        assert_eq!(Partition::parse("homo").unwrap().alpha, None);
        for bad in ["hetero", "hetero:x", "hetero:0", "iid"] {
            assert!(Partition::parse(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn rounds_to_target_final_and_best() {
        let r = run("FedAvg", "hetero:0.5", &[0.9, 0.971, 0.965, 0.975]);
        assert_eq!(r.rounds_to_target, Some(2));
        assert_eq!(r.final_accuracy, Some(0.975));
        assert_eq!(r.best_accuracy, Some(0.975));
        let never = run("FedNova", "hetero:0.5", &[0.5, 0.6]);
        assert_eq!(never.rounds_to_target, None);
        let table = markdown_table(&[r, never], 0.97);
        assert!(
            table.contains("| FedAvg | 2 | 97.50% (97.50%) |"),
            "{table}"
        );
        assert!(
            table.contains("| FedNova | not in 2 | 60.00% (60.00%) |"),
            "{table}"
        );
    }

    #[test]
    fn the_figure_has_a_panel_per_partition_and_a_curve_per_strategy() {
        let runs = [
            run("FedAvg", "hetero:0.1", &[0.5, 0.7]),
            run("SCAFFOLD", "hetero:0.1", &[0.6, 0.8]),
            run("FedAvg", "hetero:0.5", &[0.8, 0.9]),
        ];
        let svg = figure(&runs, "t");
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        assert!(svg.contains("hetero α=0.1") && svg.contains("hetero α=0.5"));
        assert!(svg.contains(r#"data-series="SCAFFOLD""#));
        assert!(!svg.contains("NaN"));
    }
}
