use super::*;
use crate::strategy::{FedAvg, Scaffold};
use crate::tensor::NamedTensor;

fn params(v: &[f32]) -> ParamSet {
    ParamSet::new(vec![
        NamedTensor::new("w", vec![v.len()], v.to_vec()).unwrap()
    ])
    .unwrap()
}

fn config(dp: &str) -> Config {
    Config::from_yaml_str(
        &format!(
            "train_args:\n  client_num_in_total: 100\n  client_num_per_round: 10\n  \
             comm_round: 50\ndp_args:\n  enable_dp: true\n{dp}"
        ),
        std::path::Path::new("t.yaml"),
    )
    .unwrap()
}

fn settings(dp: &str) -> DpSettings {
    dp_from_config(&config(dp)).unwrap().unwrap()
}

#[test]
fn the_noise_is_chosen_to_fit_the_budget_and_the_accountant_charges_it() {
    let s = settings("  epsilon: 3.0\n  delta: 1.0e-5\n  clipping_norm: 0.5\n");
    assert_eq!(s.mode, DpMode::Central);
    assert!((s.q - 0.1).abs() < 1e-12);
    // 50 rounds at q = 0.1 spend at most ε = 3, and barely less noise would spend more.
    let mut acc = RdpAccountant::new();
    acc.step_many(s.q, s.noise_multiplier, 50);
    let spent = acc.epsilon(1e-5);
    assert!(
        spent <= 3.0 && spent > 2.95,
        "{spent} at z = {}",
        s.noise_multiplier
    );

    let mut p = Private::new(Box::new(FedAvg::default()), s.clone()).unwrap();
    let g = params(&[0.0; 4]);
    let mut last = 0.0;
    for round in 1..=3 {
        let agg = p.begin_round(round, &g);
        let end = p.end_round(round, &g, agg.finish(&[]));
        let e = end.metrics["dp_epsilon"];
        assert!(e > last, "ε grows every round: {e} after {last}");
        last = e;
        assert_eq!(end.metrics["dp_clip"], 0.5);
    }
    let mut three = RdpAccountant::new();
    three.step_many(s.q, s.noise_multiplier, 3);
    assert!((three.epsilon(1e-5) - last).abs() < 1e-9);
}

#[test]
fn central_dp_clips_each_update_and_noises_the_sum() {
    let mut s = settings("  noise_multiplier: 1.0e-6\n  clipping_norm: 1.0\n");
    s.per_round = 2;
    let mut p = Private::new(Box::new(FedAvg::default()), s).unwrap();
    let g = params(&[0.0, 0.0]);
    let mut agg = p.begin_round(1, &g);
    // Norm 5, cut to 1; and one under the bound.
    agg.add(
        "a",
        &ParamsView::of(&params(&[3.0, 4.0])),
        1000,
        &Report::new(),
    )
    .unwrap();
    agg.add(
        "b",
        &ParamsView::of(&params(&[0.2, 0.0])),
        1,
        &Report::new(),
    )
    .unwrap();
    let next = agg.finish(&[]).unwrap();
    // Every client weighted alike: ((0.6, 0.8) + (0.2, 0)) / 2.
    let w = next.get("w").unwrap().data();
    assert!(
        (w[0] - 0.4).abs() < 1e-4 && (w[1] - 0.4).abs() < 1e-4,
        "{w:?}"
    );
    // Real noise: z·C = 0.5 on the sum of two.
    let mut s = settings("  noise_multiplier: 0.5\n  clipping_norm: 1.0\n");
    s.per_round = 2;
    let mut p = Private::new(Box::new(FedAvg::default()), s).unwrap();
    let g = params(&[0.0; 4000]);
    let mut agg = p.begin_round(1, &g);
    for c in ["a", "b"] {
        agg.add(c, &ParamsView::of(&g), 1, &Report::new()).unwrap();
    }
    let w = agg.finish(&[]).unwrap().get("w").unwrap().data().to_vec();
    let var = w.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / w.len() as f64;
    // (0.5/2)² = 0.0625.
    assert!((var - 0.0625).abs() < 0.01, "variance {var}");
}

#[test]
fn a_small_budget_stops_the_run_before_it_is_overspent() {
    let s = settings("  noise_multiplier: 2.0\n  stop_training_at_epsilon: 1.0\n");
    let mut p = Private::new(Box::new(FedAvg::default()), s).unwrap();
    let g = params(&[0.0]);
    let mut rounds = 0;
    let mut spent = 0.0;
    while p.stop().is_none() && rounds < 1000 {
        rounds += 1;
        let agg = p.begin_round(rounds, &g);
        spent = p.end_round(rounds, &g, agg.finish(&[])).metrics["dp_epsilon"];
    }
    assert!(spent <= 1.0, "{spent}");
    let why = p.stop().unwrap();
    assert!(why.contains("stop_training_at_epsilon = 1"), "{why}");
    let mut next = RdpAccountant::new();
    next.step_many(0.1, 2.0, rounds + 1);
    assert!(
        rounds > 1 && next.epsilon(1e-5) > 1.0,
        "{rounds}: one more would overspend"
    );
    // A budget below one round's cost is refused before the run starts.
    let e = dp_from_config(&config(
        "  noise_multiplier: 1.0\n  stop_training_at_epsilon: 1.0\n",
    ))
    .unwrap_err();
    assert!(
        e.contains("one round") && e.contains("stop_training_at_epsilon"),
        "{e}"
    );
}

#[test]
fn adaptive_clipping_follows_the_quantile_and_pays_for_its_count() {
    let s = settings("  noise_multiplier: 0.8\n  adaptive_clipping: true\n  clipping_norm: 10.0\n");
    let a = s.adaptive.unwrap();
    assert_eq!(a.count_std, 0.5);
    // z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) > z: the count takes part of the budget.
    assert!(s.noise_multiplier > 0.8 && s.accounted_multiplier == 0.8);
    let mut p = Private::new(Box::new(FedAvg::default()), s).unwrap();
    let g = params(&[0.0, 0.0]);
    // Every update is far under C = 10: C shrinks towards the median norm.
    let mut clip = 10.0;
    for round in 1..=10 {
        let mut agg = p.begin_round(round, &g);
        for i in 0..10 {
            agg.add(
                &format!("c{i}"),
                &ParamsView::of(&params(&[0.1, 0.0])),
                1,
                &Report::new(),
            )
            .unwrap();
        }
        let end = p.end_round(round, &g, agg.finish(&[]));
        clip = p.ledger().clip;
        assert!(end.metrics.contains_key("dp_unclipped_noised"));
    }
    assert!(clip < 10.0 * (-0.2f64 * 0.3 * 10.0).exp(), "C = {clip}");
}

#[test]
fn clients_are_told_their_share_of_the_noise() {
    let ddp = Config::from_yaml_str(
        "train_args:\n  client_num_in_total: 100\n  client_num_per_round: 16\n  comm_round: 5\n\
         secure_aggregation_args:\n  enable_sa: true\nfedmq_args:\n  weighting: uniform\n\
         dp_args:\n  enable_dp: true\n  dp_solution_type: ddp\n  noise_multiplier: 2.0\n  \
         clipping_norm: 0.5\n",
        std::path::Path::new("t.yaml"),
    )
    .unwrap();
    let s = dp_from_config(&ddp).unwrap().unwrap();
    let p = Private::new(Box::new(FedAvg::default()), s).unwrap();
    let i = p.instruction(1, "c").unwrap();
    // Sixteen shares of N(0, (zC/4)²) sum to N(0, (zC)²).
    assert_eq!(i.params[DP_GAUSSIAN], 2.0 * 0.5 / 4.0);
    assert_eq!(i.params[DP_CLIP], 0.5);
    assert!(p.secure_aggregation().is_ok());

    let ldp = settings("  dp_solution_type: ldp\n  epsilon: 2.0\n  mechanism_type: laplace\n  clipping_norm: 0.1\n");
    let p = Private::new(Box::new(FedAvg::default()), ldp).unwrap();
    let i = p.instruction(1, "c").unwrap();
    assert!((i.params[DP_LAPLACE] - 0.1).abs() < 1e-12, "b = 2C/ε");
}

#[test]
fn bad_privacy_settings_are_errors_naming_the_key() {
    let err = |dp: &str| dp_from_config(&config(dp)).unwrap_err();
    assert!(err("  epsilon: -1\n").contains("dp_args.epsilon must be a positive"));
    assert!(err("  epsilon: 1\n  delta: 1.5\n").contains("dp_args.delta"));
    assert!(err("  dp_solution_type: cdpp\n  epsilon: 1\n").contains("dp_solution_type"));
    assert!(err("").contains("set epsilon"));
    assert!(err("  epsilon: 1\n  mechanism_type: laplace\n").contains("laplace is for ldp"));
    assert!(err("  dp_solution_type: ddp\n  epsilon: 1\n").contains("turn secure aggregation on"));
    assert!(
        err("  stop_training_at_epsilon: 0\n  epsilon: 1\n").contains("stop_training_at_epsilon")
    );
    let sa = Config::from_yaml_str(
        "secure_aggregation_args:\n  enable_sa: true\ndp_args:\n  enable_dp: true\n  epsilon: 1\n",
        std::path::Path::new("t.yaml"),
    )
    .unwrap();
    assert!(dp_from_config(&sa).unwrap_err().contains("use ddp"));
    let e = Private::new(
        Box::new(Scaffold::new(1.0).unwrap()),
        settings("  noise_multiplier: 1.0\n"),
    )
    .err()
    .unwrap();
    assert!(e.contains("SCAFFOLD"), "{e}");
    // The whole config reports them too.
    let e = config("  epsilon: -1\n")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("dp_args.epsilon"), "{e}");
}
