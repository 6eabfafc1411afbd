use super::*;
use crate::config::DefenseArgs;
use crate::strategy::{FedAvg, Scaffold};
use crate::tensor::NamedTensor;

fn params(v: &[f32]) -> ParamSet {
    ParamSet::new(vec![
        NamedTensor::new("a.weight", vec![v.len() - 1], v[..v.len() - 1].to_vec()).unwrap(),
        NamedTensor::new("b.bias", vec![1], vec![v[v.len() - 1]]).unwrap(),
    ])
    .unwrap()
}

fn args(kind: &str) -> DefenseArgs {
    DefenseArgs {
        enable_defense: true,
        defense_type: kind.into(),
        byzantine_client_num: 3,
        ..DefenseArgs::default()
    }
}

/// Seven honest clients move the model by about +1 in every parameter, three attackers by −50.
fn round(defense: Defense) -> (Vec<f32>, BTreeMap<String, f64>) {
    round_with(defense, 3)
}

/// `10 − bad` honest clients and `bad` attackers.
fn round_with(defense: Defense, bad: usize) -> (Vec<f32>, BTreeMap<String, f64>) {
    let mut s = Defended::new(Box::new(FedAvg::default()), defense).unwrap();
    let g = params(&[0.0, 0.0, 0.0]);
    let mut agg = s.begin_round(1, &g);
    for i in 0..10 {
        let v = if i < 10 - bad {
            let e = i as f32 * 0.01;
            [1.0 + e, 1.0 - e, 1.0 + e / 2.0]
        } else {
            [-50.0, -50.0, -50.0]
        };
        agg.add(
            &format!("c{i}"),
            &ParamsView::of(&params(&v)),
            100,
            &Report::new(),
        )
        .unwrap();
    }
    let next = agg.finish(&[]).unwrap();
    let end = s.end_round(1, &g, Some(next));
    let flat = end
        .global
        .unwrap()
        .tensors()
        .iter()
        .flat_map(|t| t.data().to_vec())
        .collect();
    (flat, end.metrics)
}

fn defense(kind: &str) -> Defense {
    defense_from_config(&args(kind), 10, None).unwrap().unwrap()
}

#[test]
fn robust_rules_keep_the_honest_direction_that_the_mean_loses() {
    // The plain mean is dragged to about −14.3.
    for kind in ["median", "trimmed_mean", "krum", "multikrum", "geo_median"] {
        let (g, m) = round(defense(kind));
        assert!(
            g.iter().all(|x| (0.9..1.1).contains(x)),
            "{kind}: {g:?} ({m:?})"
        );
    }
    let (_, m) = round(defense("krum"));
    assert_eq!(m.get("defense_selected"), Some(&1.0));
    let (_, m) = round(defense("multikrum"));
    assert_eq!(m.get("defense_selected"), Some(&7.0), "m = n − f");
    // BARFED's fence (Q3 + 1.5·IQR) holds out two attackers of ten; with three, its upper
    // quartile already sits among them and the fence lets them in.
    let (g, m) = round_with(defense("barfed"), 2);
    assert!(g.iter().all(|x| (0.9..1.1).contains(x)), "{g:?}");
    assert_eq!(m.get("defense_excluded"), Some(&2.0));
    let (g, _) = round(defense("barfed"));
    assert!(g.iter().all(|x| *x < -10.0), "{g:?}");
}

#[test]
fn clipping_bounds_each_update() {
    // Each attacker's change (norm 50·√3) is cut to norm 2: the mean stays positive.
    let mut a = args("norm_diff_clipping");
    a.norm_bound = 2.0;
    let (g, m) = round(defense_from_config(&a, 10, None).unwrap().unwrap());
    let attacker = -2.0 / 3f32.sqrt();
    let expected = (7.0 + 3.0 * attacker) / 10.0;
    assert!(expected > 0.3, "{expected}");
    assert!(g.iter().all(|x| (x - expected).abs() < 0.03), "{g:?}");
    assert_eq!(m.get("defense_clipped"), Some(&3.0));
    // Centered clipping, τ = 10 around 0: the attackers are held to norm 10.
    let (g, _) = round(Defense::CenteredClip {
        tau: 10.0,
        iters: 3,
    });
    assert!(g.iter().all(|x| *x > -2.0), "{g:?}");
    // Weak DP adds noise around the clipped mean.
    let (g, _) = round(Defense::WeakDp {
        bound: 2.0,
        stddev: 0.01,
    });
    assert!(g.iter().all(|x| (x - expected).abs() < 0.1), "{g:?}");
}

#[test]
fn fltrust_trusts_what_agrees_with_the_root_update() {
    // The server's own root update moves every parameter by +1.
    let root: Arc<RootTrainer> = Arc::new(|g: &ParamSet| {
        let mut x = g.clone();
        for t in x.tensors_mut() {
            t.data_mut().iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(x)
    });
    let mut a = args("fltrust");
    a.root_data_size = 10;
    let d = defense_from_config(&a, 10, Some(root)).unwrap().unwrap();
    let (g, _) = round(d);
    assert!(g.iter().all(|x| (0.9..1.1).contains(x)), "{g:?}");
}

#[test]
fn foolsgold_silences_clients_that_push_the_same_way() {
    // Honest client i moves parameter i (non-IID clients move apart); the three sybils all push
    // every parameter down together.
    let mut s = Defended::new(Box::new(FedAvg::default()), defense("foolsgold")).unwrap();
    let g = params(&[0.0; 10]);
    let mut agg = s.begin_round(1, &g);
    for i in 0..10 {
        let mut v = [0f32; 10];
        if i < 7 {
            v[i] = 1.0;
        } else {
            v = [-5.0; 10];
        }
        agg.add(
            &format!("c{i}"),
            &ParamsView::of(&params(&v)),
            100,
            &Report::new(),
        )
        .unwrap();
    }
    let next = agg.finish(&[]).unwrap();
    let flat: Vec<f32> = next
        .tensors()
        .iter()
        .flat_map(|t| t.data().to_vec())
        .collect();
    assert!(flat.iter().all(|x| *x >= 0.0), "{flat:?}");
    assert!(flat[..7].iter().all(|x| *x > 0.1), "{flat:?}");
}

#[test]
fn bad_defense_settings_are_errors_naming_the_key() {
    let e = defense_from_config(&args("krum"), 8, None).unwrap_err();
    assert!(
        e.contains("byzantine_client_num") && e.contains("2f + 2"),
        "{e}"
    );
    let e = defense_from_config(&args("fltrust"), 10, None).unwrap_err();
    assert!(e.contains("root_data_size"), "{e}");
    let e = defense_from_config(&args("bulyan"), 10, None).unwrap_err();
    assert!(e.contains("defense_type") && e.contains("multikrum"), "{e}");
    let mut t = args("trimmed_mean");
    t.trim_param_b = Some(5);
    let e = defense_from_config(&t, 10, None).unwrap_err();
    assert!(e.contains("trim_param_b"), "{e}");
    let mut n = args("norm_diff_clipping");
    n.norm_bound = -1.0;
    assert!(defense_from_config(&n, 10, None)
        .unwrap_err()
        .contains("norm_bound"));
    assert!(defense_from_config(&DefenseArgs::default(), 10, None)
        .unwrap()
        .is_none());
    // A strategy that aggregates more than the mean is refused, and so is secure aggregation.
    let e = Defended::new(Box::new(Scaffold::new(1.0).unwrap()), Defense::Median)
        .err()
        .unwrap();
    assert!(e.contains("SCAFFOLD"), "{e}");
    let s = Defended::new(Box::new(FedAvg::default()), Defense::Median).unwrap();
    assert!(s
        .secure_aggregation()
        .unwrap_err()
        .contains("secure aggregation"));
}

#[test]
fn bad_updates_are_refused_and_the_round_goes_on() {
    let mut s = Defended::new(Box::new(FedAvg::default()), Defense::Median).unwrap();
    let g = params(&[0.0, 0.0, 0.0]);
    let mut agg = s.begin_round(1, &g);
    let nan = params(&[f32::NAN, 0.0, 0.0]);
    assert!(matches!(
        agg.add("x", &ParamsView::of(&nan), 1, &Report::new()),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        agg.add(
            "y",
            &ParamsView::of(&params(&[1.0, 1.0])),
            1,
            &Report::new()
        ),
        Err(Error::Layout { .. })
    ));
    agg.add(
        "z",
        &ParamsView::of(&params(&[2.0, 2.0, 2.0])),
        1,
        &Report::new(),
    )
    .unwrap();
    assert_eq!(agg.count(), 1);
    let m = agg.finish(&[]).unwrap();
    assert_eq!(m.get("a.weight").unwrap().data(), &[2.0, 2.0]);
}
