//! The end-of-run summary table for the terminal.

use super::RoundRecord;
use std::fmt::Write as _;

const HEADERS: [&str; 8] = [
    "round",
    "acc %",
    "test loss",
    "train loss",
    "round s",
    "MiB moved",
    "clients",
    "failures",
];
const MIB: f64 = 1024.0 * 1024.0;

/// A fixed-width plain-text table for the terminal: round | acc % | test loss | train loss |
/// round s | MiB moved | clients | failures, one row per round, then a total/last line (final
/// accuracy, total time, total MiB). Uses "-" for missing values.
///
/// Accuracy is shown in percent with two decimals (`98.12`), losses with four, seconds and MiB with
/// two. The `total` row holds the last evaluated accuracy and test loss, the last train loss, the sum
/// of round seconds, of MiB and of failures; the line after it gives the final accuracy with its
/// round, the total time since the run started (the last `elapsed_s`) and the MiB moved. Every line
/// ends with a newline.
pub fn summary_table(records: &[RoundRecord]) -> String {
    let mut rows: Vec<[String; 8]> = records
        .iter()
        .map(|r| {
            [
                r.round.to_string(),
                opt(r.test_accuracy.map(|a| a * 100.0), 2),
                opt(r.test_loss, 4),
                opt(r.train_loss, 4),
                format!("{:.2}", r.round_s),
                format!("{:.2}", r.bytes as f64 / MIB),
                r.participants.to_string(),
                r.failures.to_string(),
            ]
        })
        .collect();

    let last_eval = records.iter().rev().find(|r| r.test_accuracy.is_some());
    let final_acc = last_eval.and_then(|r| r.test_accuracy).map(|a| a * 100.0);
    let last_test_loss = records.iter().rev().find_map(|r| r.test_loss);
    let last_train_loss = records.iter().rev().find_map(|r| r.train_loss);
    let total_round_s: f64 = records.iter().map(|r| r.round_s).sum();
    let total_bytes: u64 = records.iter().map(|r| r.bytes).fold(0, u64::saturating_add);
    let total_mib = total_bytes as f64 / MIB;
    let total_failures: usize = records.iter().map(|r| r.failures).sum();
    let total_time = records.last().map(|r| r.elapsed_s);
    rows.push([
        "total".to_string(),
        opt(final_acc, 2),
        opt(last_test_loss, 4),
        opt(last_train_loss, 4),
        format!("{total_round_s:.2}"),
        format!("{total_mib:.2}"),
        "-".to_string(),
        total_failures.to_string(),
    ]);

    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let rule = "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1));

    let mut out = String::new();
    push_row(&mut out, &HEADERS, &widths);
    let _ = writeln!(out, "{rule}");
    let (round_rows, total_row) = rows.split_at(rows.len() - 1);
    if round_rows.is_empty() {
        let _ = writeln!(out, "(no rounds recorded)");
    }
    for row in round_rows {
        push_row(&mut out, row, &widths);
    }
    let _ = writeln!(out, "{rule}");
    push_row(&mut out, &total_row[0], &widths);

    let acc_text = match (final_acc, last_eval) {
        (Some(a), Some(r)) => format!("{a:.2}% (round {})", r.round),
        _ => "-".to_string(),
    };
    let time_text = total_time.map_or_else(|| "-".to_string(), |t| format!("{t:.2} s"));
    let _ = writeln!(
        out,
        "final accuracy {acc_text}, total time {time_text}, {total_mib:.2} MiB moved in {} round{}",
        records.len(),
        if records.len() == 1 { "" } else { "s" }
    );
    if let Some(line) = client_eval_line(records) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The last round's measure on the clients' own test samples (models with local parameters,
/// which the server cannot evaluate), e.g. `clients' test sets: RMSE 0.9714, MAE 0.7650 (round
/// 30)`; `None` when no round has one.
pub fn client_eval_line(records: &[RoundRecord]) -> Option<String> {
    records
        .iter()
        .rev()
        .find_map(|r| client_eval_text(r).map(|t| format!("{t} (round {})", r.round)))
}

/// A round's measure on the clients' own test samples, e.g. `clients' test sets: RMSE 0.9714,
/// MAE 0.7650`; `None` when the round has none.
pub fn client_eval_text(r: &RoundRecord) -> Option<String> {
    let m = &r.strategy;
    let what = match (
        m.get("client_test_rmse"),
        m.get("client_test_mae"),
        m.get("client_test_accuracy"),
    ) {
        (Some(rmse), Some(mae), _) => format!("RMSE {rmse:.4}, MAE {mae:.4}"),
        (Some(rmse), None, _) => format!("RMSE {rmse:.4}"),
        (None, _, Some(acc)) => format!("accuracy {:.2}%", acc * 100.0),
        (None, _, None) => return None,
    };
    Some(format!("clients' test sets: {what}"))
}
fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// One line, every cell right-aligned in its column, two spaces between columns.
fn push_row<S: AsRef<str>>(out: &mut String, cells: &[S], widths: &[usize]) {
    let line: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(c, &w)| format!("{:>w$}", c.as_ref()))
        .collect();
    let _ = writeln!(out, "{}", line.join("  "));
}
