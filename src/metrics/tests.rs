use super::*;

fn record(round: u64, acc: Option<f64>) -> RoundRecord {
    RoundRecord {
        round,
        test_accuracy: acc,
        test_loss: acc.map(|a| 1.0 - a),
        train_loss: Some(0.5 / round.max(1) as f64),
        round_s: 1.25,
        eval_s: acc.map(|_| 0.5),
        elapsed_s: 2.0 * round as f64,
        bytes: 3 << 20,
        participants: 4,
        failures: 0,
        failed_clients: vec![],
        num_samples: 1000,
        retries: 0,
        strategy: Default::default(),
    }
}

/// A run of `n` rounds, evaluated every `every` rounds (and on the last), accuracy rising to ~98%.
fn run(n: u64, every: u64) -> Vec<RoundRecord> {
    (1..=n)
        .map(|i| {
            let acc = (i % every == 0 || i == n).then(|| 0.98 - 0.5 / i as f64);
            record(i, acc)
        })
        .collect()
}

// ---- writer, JSONL, CSV ----

#[test]
fn resume_keeps_the_checkpointed_rounds_and_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut w = MetricsWriter::create(dir).unwrap();
    let rs = run(3, 1);
    for r in &rs {
        w.record(r).unwrap();
    }
    drop(w);
    // A crash cut a line short after round 3.
    let jsonl = dir.join(JSONL_FILE);
    let mut f = OpenOptions::new().append(true).open(&jsonl).unwrap();
    f.write_all(b"{\"round\":4,\"test_acc").unwrap();
    drop(f);
    let before = std::fs::read_to_string(&jsonl).unwrap();
    // The checkpoint covers round 2: round 3 (after it) and the broken line go.
    let mut w = MetricsWriter::resume(dir, 2).unwrap();
    assert_eq!(w.records(), &rs[..2]);
    let mut r3 = record(3, Some(0.9));
    r3.elapsed_s = 99.0;
    w.record(&r3).unwrap();
    let after = std::fs::read_to_string(&jsonl).unwrap();
    let kept: String = before.split_inclusive('\n').take(2).collect();
    assert!(
        after.starts_with(&kept),
        "earlier rounds kept byte for byte"
    );
    assert_eq!(
        read_jsonl(&jsonl).unwrap(),
        vec![rs[0].clone(), rs[1].clone(), r3]
    );
    let csv = std::fs::read_to_string(dir.join(CSV_FILE)).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.lines().nth(3).unwrap().starts_with("3,0.9,"), "{csv}");
}

#[test]
fn resume_without_earlier_files_creates_them() {
    let tmp = tempfile::tempdir().unwrap();
    let w = MetricsWriter::resume(tmp.path(), 5).unwrap();
    assert!(w.records().is_empty());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join(CSV_FILE)).unwrap(),
        format!("{CSV_HEADER}\n")
    );
}

#[test]
fn writer_round_trips_through_read_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("runs").join("r1"); // parents are created
    let mut w = MetricsWriter::create(&dir).unwrap();
    assert_eq!(w.dir(), dir);
    let mut rs = run(5, 2);
    rs[1].failures = 2;
    rs[1].failed_clients = vec![
        "client-3: timeout".into(),
        "client-7: said \"no\", twice\n".into(),
    ];
    rs[2].train_loss = None;
    rs[3].round_s = 0.1 + 0.2; // needs all 17 digits
    rs[4].bytes = u64::MAX;
    rs[4].retries = u32::MAX;
    for r in &rs {
        w.record(r).unwrap();
    }
    assert_eq!(w.records(), &rs[..]);
    let back = read_jsonl(&dir.join(JSONL_FILE)).unwrap();
    assert_eq!(back, rs);

    // One object per line, None as null.
    let text = std::fs::read_to_string(dir.join(JSONL_FILE)).unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(text.ends_with('\n'));
    assert!(text
        .lines()
        .next()
        .unwrap()
        .contains(r#""test_accuracy":null"#));

    // Creating again truncates both files.
    let w2 = MetricsWriter::create(&dir).unwrap();
    assert!(w2.records().is_empty());
    assert_eq!(read_jsonl(&dir.join(JSONL_FILE)).unwrap(), vec![]);
    assert_eq!(
        std::fs::read_to_string(dir.join(CSV_FILE)).unwrap(),
        format!("{CSV_HEADER}\n")
    );
}

#[test]
fn non_finite_values_read_back_without_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = MetricsWriter::create(tmp.path()).unwrap();
    let mut r = record(1, Some(0.5));
    r.train_loss = Some(f64::NAN);
    r.round_s = f64::INFINITY;
    w.record(&r).unwrap();
    let back = read_jsonl(&tmp.path().join(JSONL_FILE)).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].train_loss, None);
    assert!(back[0].round_s.is_nan());
    assert_eq!(back[0].test_accuracy, Some(0.5));
}

#[test]
fn csv_header_and_rows_are_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = MetricsWriter::create(tmp.path()).unwrap();
    let full = RoundRecord {
        round: 1,
        test_accuracy: Some(0.9812),
        test_loss: Some(0.0625),
        train_loss: Some(0.1),
        round_s: 2.5,
        eval_s: Some(0.75),
        elapsed_s: 3.0,
        bytes: 1_048_576,
        participants: 10,
        failures: 1,
        failed_clients: vec!["client-3: timeout".into()],
        num_samples: 60_000,
        retries: 2,
        strategy: [("server_update_norm".to_string(), 0.5)].into(),
    };
    let sparse = RoundRecord {
        round: 2,
        test_accuracy: None,
        test_loss: None,
        train_loss: Some(0.1 + 0.2),
        round_s: 1.5,
        eval_s: None,
        elapsed_s: 10.125,
        bytes: 2048,
        participants: 3,
        failures: 2,
        failed_clients: vec![
            "client-3: timeout".into(),
            "client-7: said \"no\", twice".into(),
        ],
        num_samples: 1200,
        retries: 0,
        strategy: Default::default(),
    };
    let none = RoundRecord {
        round: 3,
        train_loss: None,
        failures: 0,
        failed_clients: vec![],
        ..sparse.clone()
    };
    w.record(&full).unwrap();
    w.record(&sparse).unwrap();
    w.record(&none).unwrap();
    let csv = std::fs::read_to_string(tmp.path().join(CSV_FILE)).unwrap();
    let expected =
        "round,test_accuracy,test_loss,train_loss,round_s,eval_s,elapsed_s,bytes,participants,\
                    failures,num_samples,retries,failed_clients\n\
                    1,0.9812,0.0625,0.1,2.5,0.75,3,1048576,10,1,60000,2,client-3: timeout\n\
                    2,,,0.30000000000000004,1.5,,10.125,2048,3,2,1200,0,\
                    \"client-3: timeout;client-7: said \"\"no\"\", twice\"\n\
                    3,,,,1.5,,10.125,2048,3,0,1200,0,\n";
    assert_eq!(csv, expected);
    // Displayed floats round-trip.
    assert_eq!("0.30000000000000004".parse::<f64>().unwrap(), 0.1 + 0.2);
}

#[test]
fn csv_field_quotes_only_when_needed() {
    assert_eq!(csv_field("client-1: crashed"), "client-1: crashed");
    assert_eq!(csv_field(""), "");
    assert_eq!(csv_field("a;b"), "\"a;b\"");
    assert_eq!(csv_field("a,b"), "\"a,b\"");
    assert_eq!(csv_field("line\nbreak"), "\"line\nbreak\"");
    assert_eq!(csv_field("cr\r"), "\"cr\r\"");
    assert_eq!(csv_field(r#"say "hi""#), r#""say ""hi""""#);
}

#[test]
fn read_jsonl_errors_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(JSONL_FILE);
    let good = serde_json::to_string(&record(1, Some(0.5))).unwrap();
    // A blank line is skipped but still counted; line 4 is cut short as after a crash.
    std::fs::write(
        &path,
        format!("{good}\n{good}\n\n{}\n", &good[..good.len() / 2]),
    )
    .unwrap();
    let err = read_jsonl(&path).unwrap_err();
    match &err {
        MetricsError::Parse {
            path: p,
            line,
            reason,
        } => {
            assert_eq!(p, &path);
            assert_eq!(*line, 4);
            assert!(!reason.is_empty());
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with(&format!("{}:4: ", path.display())),
        "{err}"
    );

    let missing = tmp.path().join("nope.jsonl");
    let err = read_jsonl(&missing).unwrap_err();
    assert!(
        matches!(&err, MetricsError::Io { path, .. } if path == &missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
}

#[test]
fn create_fails_with_the_path_when_dir_is_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let err = MetricsWriter::create(&file.join("sub")).unwrap_err();
    assert!(matches!(err, MetricsError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("plain"), "{err}");
    assert!(err.to_string().contains("writable"), "{err}");
}

// ---- SVG ----

/// A small XML well-formedness check: balanced and properly nested tags, one root element,
/// quoted attributes, no raw `<` in text or `<`/`&` outside entities.
fn assert_well_formed(xml: &str) {
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        check_text(&rest[..open]);
        assert!(
            !stack.is_empty() || rest[..open].trim().is_empty(),
            "text outside the root"
        );
        let close = rest[open..].find('>').expect("unclosed tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name.trim()), "mismatched </{name}>");
        } else {
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body.split_whitespace().next().expect("empty tag");
            check_attributes(&body[name.len()..]);
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    assert!(rest.trim().is_empty(), "trailing text");
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    assert_eq!(roots, 1, "exactly one root element");
}

fn check_text(text: &str) {
    assert!(!text.contains('<'), "raw '<' in {text:?}");
    let mut parts = text.split('&');
    parts.next();
    for p in parts {
        let entity = &p[..p.find(';').expect("'&' without ';'")];
        assert!(
            ["amp", "lt", "gt", "quot", "apos"].contains(&entity),
            "unknown entity &{entity};"
        );
    }
}

fn check_attributes(mut attrs: &str) {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return;
        }
        let eq = attrs.find('=').expect("attribute without =");
        let name = &attrs[..eq];
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "bad attribute name {name:?}"
        );
        let after = &attrs[eq + 1..];
        assert!(after.starts_with('"'), "unquoted attribute {name}");
        let end = after[1..].find('"').expect("unterminated attribute") + 1;
        check_text(&after[1..end]);
        attrs = &after[end + 1..];
    }
}

/// The points of the polyline tagged `data-series="{series}"`, if any.
fn polyline_points(svg: &str, series: &str) -> Option<Vec<(f64, f64)>> {
    let start = svg.find(&format!(r#"<polyline data-series="{series}""#))?;
    let tag = &svg[start..start + svg[start..].find("/>").unwrap()];
    let p = tag.find(r#"points=""#).unwrap() + r#"points=""#.len();
    let points = &tag[p..p + tag[p..].find('"').unwrap()];
    Some(
        points
            .split_whitespace()
            .map(|xy| {
                let (x, y) = xy.split_once(',').unwrap();
                let (x, y) = (x.parse::<f64>().unwrap(), y.parse::<f64>().unwrap());
                assert!(x.is_finite() && y.is_finite());
                (x, y)
            })
            .collect(),
    )
}

fn assert_clean_svg(svg: &str) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.ends_with("</svg>"));
    for bad in ["NaN", "nan", "inf"] {
        assert!(!svg.contains(bad), "SVG contains {bad}");
    }
    assert_well_formed(svg);
}

#[test]
fn svg_is_well_formed_with_escaped_title_and_one_point_per_evaluated_round() {
    let mut rs = run(30, 3);
    // Non-finite values are skipped, not drawn.
    rs[4].train_loss = Some(f64::NAN);
    rs[5].test_loss = Some(f64::INFINITY);
    rs[6].train_loss = None;
    let svg = render_plot_svg(&rs, r#"MNIST <cnn> & "FedAvg" 'α'"#);
    assert_clean_svg(&svg);
    assert!(svg.contains("MNIST &lt;cnn&gt; &amp; &quot;FedAvg&quot; &apos;α&apos;"));
    assert!(!svg.contains("<cnn>"));

    let evaluated = rs.iter().filter(|r| r.test_accuracy.is_some()).count();
    assert_eq!(evaluated, 10);
    let acc = polyline_points(&svg, "test-accuracy").expect("accuracy line");
    assert_eq!(acc.len(), evaluated);
    // Accuracy rises, so y (downwards in SVG) falls; x increases with the round.
    assert!(
        acc.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1),
        "{acc:?}"
    );
    assert_eq!(
        polyline_points(&svg, "test-loss").unwrap().len(),
        evaluated - 1
    );
    assert_eq!(polyline_points(&svg, "train-loss").unwrap().len(), 28);
    assert!(svg.contains("accuracy (%)") && svg.contains(">round<") && svg.contains(">loss<"));
    assert!(
        svg.contains("test accuracy (last 96.33%)"),
        "legend with the last accuracy"
    );
    assert!(svg.contains("train loss") && svg.contains("test loss"));
    assert!(!svg.contains("no evaluation recorded"));
}

#[test]
fn svg_with_hundreds_of_rounds_draws_lines_without_markers() {
    let rs = run(500, 1);
    let svg = render_plot_svg(&rs, "long run");
    assert_clean_svg(&svg);
    assert_eq!(polyline_points(&svg, "test-accuracy").unwrap().len(), 500);
    assert_eq!(polyline_points(&svg, "train-loss").unwrap().len(), 500);
    assert_eq!(svg.matches("<circle").count(), 0);
    // Round ticks stay few and readable.
    let ticks = svg.matches(r#"text-anchor="middle">"#).count();
    assert!(ticks < 40, "{ticks} centered labels");
}

#[test]
fn svg_without_evaluation_says_so() {
    let rs: Vec<_> = (1..=4).map(|i| record(i, None)).collect();
    let svg = render_plot_svg(&rs, "no eval");
    assert_clean_svg(&svg);
    assert!(svg.contains("no evaluation recorded"));
    assert!(polyline_points(&svg, "test-accuracy").is_none());
    assert!(polyline_points(&svg, "test-loss").is_none());
    assert_eq!(polyline_points(&svg, "train-loss").unwrap().len(), 4);
    assert!(!svg.contains("no loss recorded"));
}

#[test]
fn svg_with_no_records_or_one_record_does_not_panic() {
    let svg = render_plot_svg(&[], "");
    assert_clean_svg(&svg);
    assert!(svg.contains("no evaluation recorded") && svg.contains("no loss recorded"));

    let one = [record(0, Some(0.42))];
    let svg = render_plot_svg(&one, "one");
    assert_clean_svg(&svg);
    let acc = polyline_points(&svg, "test-accuracy").unwrap();
    assert_eq!(acc.len(), 1);
    // A single point is visible (a marker) and lies inside the first panel.
    assert_eq!(svg.matches("<circle").count(), 3);
    let (x, y) = acc[0];
    assert!(
        (0.0..=500.0).contains(&x) && (0.0..=460.0).contains(&y),
        "{x},{y}"
    );

    // Extreme values never turn into NaN/inf coordinates.
    let mut odd = record(7, Some(f64::NAN));
    odd.train_loss = Some(1e300);
    odd.test_loss = Some(-0.0);
    let svg = render_plot_svg(&[odd.clone(), RoundRecord { round: 8, ..odd }], "odd");
    assert_clean_svg(&svg);
    assert!(svg.contains("no evaluation recorded"));
}

#[test]
fn finish_plot_writes_plot_svg_in_the_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = MetricsWriter::create(tmp.path()).unwrap();
    for r in run(3, 1) {
        w.record(&r).unwrap();
    }
    let path = w.finish_plot("a & b").unwrap();
    assert_eq!(path, tmp.path().join(PLOT_FILE));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, render_plot_svg(w.records(), "a & b") + "\n");
    assert!(text.contains("a &amp; b"));
}

// ---- summary table ----

#[test]
fn summary_table_shows_rounds_and_final_accuracy() {
    let mut rs = run(3, 2); // rounds 2 and 3 evaluated
    rs[2].test_accuracy = Some(0.98123);
    rs[2].test_loss = Some(0.02);
    rs[2].failures = 1;
    rs[2].failed_clients = vec!["client-3: timeout".into()];
    rs[2].elapsed_s = 42.5;
    let table = summary_table(&rs);
    let lines: Vec<&str> = table.lines().collect();
    // Header, rule, 3 rounds, rule, total, final line.
    assert_eq!(lines.len(), 8, "{table}");
    for h in [
        "round",
        "acc %",
        "test loss",
        "train loss",
        "round s",
        "MiB moved",
        "clients",
        "failures",
    ] {
        assert!(lines[0].contains(h), "{}", lines[0]);
    }
    // Fixed width: header, rows and total line up.
    let width = lines[0].len();
    for l in [lines[2], lines[3], lines[4], lines[6]] {
        assert_eq!(l.chars().count(), width, "{l:?}");
    }
    // Round 1 was not evaluated.
    let r1: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(r1, ["1", "-", "-", "0.5000", "1.25", "3.00", "4", "0"]);
    let r3: Vec<&str> = lines[4].split_whitespace().collect();
    assert_eq!(r3[..2], ["3", "98.12"]);
    assert_eq!(r3[7], "1");
    let total: Vec<&str> = lines[6].split_whitespace().collect();
    assert_eq!(
        total,
        ["total", "98.12", "0.0200", "0.1667", "3.75", "9.00", "-", "1"]
    );
    assert_eq!(
        lines[7],
        "final accuracy 98.12% (round 3), total time 42.50 s, 9.00 MiB moved in 3 rounds"
    );
}

#[test]
fn summary_table_handles_empty_and_unevaluated_runs() {
    let table = summary_table(&[]);
    assert!(table.contains("(no rounds recorded)"), "{table}");
    assert!(
        table.contains("final accuracy -, total time -, 0.00 MiB moved in 0 rounds"),
        "{table}"
    );

    let table = summary_table(&[record(1, None)]);
    assert!(
        table.contains("final accuracy -, total time 2.00 s, 3.00 MiB moved in 1 round\n"),
        "{table}"
    );
    assert!(!table.contains("clients' test sets"), "{table}");
}

#[test]
fn summary_table_shows_the_clients_own_evaluation() {
    // A model with local parameters: the server cannot evaluate, the clients measure theirs.
    let mut rated = vec![record(1, None), record(2, None), record(3, None)];
    for (r, rmse) in rated.iter_mut().zip([1.1, 0.99]) {
        r.strategy.insert("client_test_rmse".into(), rmse);
        r.strategy.insert("client_test_mae".into(), rmse * 0.8);
    }
    let table = summary_table(&rated);
    assert!(
        table.ends_with("clients' test sets: RMSE 0.9900, MAE 0.7920 (round 2)\n"),
        "{table}"
    );
    assert_eq!(client_eval_text(&rated[2]), None);
    let mut classified = record(4, None);
    classified
        .strategy
        .insert("client_test_accuracy".into(), 0.5123);
    assert_eq!(
        client_eval_text(&classified).as_deref(),
        Some("clients' test sets: accuracy 51.23%")
    );
}

#[test]
fn the_well_formedness_check_rejects_broken_xml() {
    for bad in [
        "<svg><g></svg>",
        "<svg></g></svg>",
        "<svg>a & b</svg>",
        "<svg x=1/>",
        "<svg/><svg/>",
        "<svg><text>&nbsp;</text></svg>",
    ] {
        assert!(
            std::panic::catch_unwind(|| assert_well_formed(bad)).is_err(),
            "accepted {bad}"
        );
    }
    assert_well_formed(r#"<svg a="1"><g/><text>x &amp; y</text></svg>"#);
}

#[test]
fn a_rating_run_plots_the_clients_rmse() {
    let mut records: Vec<RoundRecord> = (1..=3).map(|i| record(i, None)).collect();
    for (r, rmse) in records.iter_mut().zip([1.14, 1.01, 0.97]) {
        r.strategy.insert("client_test_rmse".into(), rmse);
        r.strategy.insert("client_test_loss".into(), rmse * rmse);
    }
    let svg = render_plot_svg(&records, "mf on ml-100k");
    assert_well_formed(&svg);
    assert!(svg.contains("Test RMSE (clients"), "{svg}");
    assert!(svg.contains("test RMSE (last 0.9700)"), "{svg}");
    assert_eq!(polyline_points(&svg, "client-test-rmse").unwrap().len(), 3);
    assert_eq!(polyline_points(&svg, "test-loss").unwrap().len(), 3);
    assert!(polyline_points(&svg, "test-accuracy").is_none());
}
