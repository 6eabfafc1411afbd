use super::*;
use crate::data::{Dataset, ImageDataset};
use crate::tensor::NamedTensor;
use std::sync::Arc;

fn params(v: Vec<f32>) -> ParamSet {
    ParamSet::new(vec![NamedTensor::new("w", vec![v.len()], v).unwrap()]).unwrap()
}

fn attack(kind: AttackKind) -> Attack {
    Attack {
        kind,
        first_round: 1,
        last_round: u64::MAX,
        target: 0,
        poison_frac: 0.5,
        sample_boost: 1.0,
    }
}

fn tampered(kind: AttackKind) -> Vec<f32> {
    let g = params(vec![1.0, 1.0, 1.0]);
    let mut x = params(vec![2.0, 0.0, 1.0]);
    attack(kind).tamper(&g, &mut x, &mut ChaCha8Rng::seed_from_u64(1));
    x.tensors()[0].data().to_vec()
}

#[test]
fn byzantine_updates_are_what_each_mode_says() {
    assert_eq!(tampered(AttackKind::Byzantine(Byzantine::Zero)), [0.0; 3]);
    // g − (x − g).
    assert_eq!(
        tampered(AttackKind::Byzantine(Byzantine::Flip)),
        [0.0, 2.0, 1.0]
    );
    assert_eq!(
        tampered(AttackKind::Byzantine(Byzantine::Scale(10.0))),
        [11.0, -9.0, 1.0]
    );
    let r = tampered(AttackKind::Byzantine(Byzantine::Random));
    assert!(r.iter().all(|v| (-1.0..=1.0).contains(v)), "{r:?}");
    assert!(r.windows(2).any(|w| w[0] != w[1]), "{r:?}");
}

#[test]
fn backdoor_updates_are_boosted_and_the_constrained_one_stays_under_its_bound() {
    // Δ = (1, −1, 0), ‖Δ‖ = √2.
    assert_eq!(
        tampered(AttackKind::ModelReplacement {
            norm: None,
            gamma: 10.0
        }),
        [11.0, -9.0, 1.0]
    );
    let s = tampered(AttackKind::ModelReplacement {
        norm: Some(4.0),
        gamma: 10.0,
    });
    let norm = ((s[0] - 1.0).powi(2) + (s[1] - 1.0).powi(2)).sqrt();
    assert!((norm - 4.0).abs() < 1e-5, "{s:?}");
    let c = tampered(AttackKind::NormConstrained {
        gamma: 10.0,
        bound: 2.0,
    });
    let norm = ((c[0] - 1.0).powi(2) + (c[1] - 1.0).powi(2)).sqrt();
    assert!(norm <= 2.0 && norm > 1.99, "{c:?} has norm {norm}");
    assert!(
        c[0] > 1.0 && c[1] < 1.0 && c[2] == 1.0,
        "same direction: {c:?}"
    );
    // Already under the bound after the boost: the boost alone.
    let small = tampered(AttackKind::NormConstrained {
        gamma: 1.0,
        bound: 100.0,
    });
    assert_eq!(small, [2.0, 0.0, 1.0]);
}

fn config(text: &str) -> Config {
    Config::from_yaml_str(text, std::path::Path::new("t.yaml")).unwrap()
}

const BASE: &str = "data_args:\n  dataset: mnist\ntrain_args:\n  client_num_in_total: 10\n  \
                    client_num_per_round: 10\n";

#[test]
fn attack_settings_are_checked_with_their_keys() {
    let on = |extra: &str| {
        config(&format!(
            "{BASE}attack_args:\n  enable_attack: true\n{extra}"
        ))
    };
    let err = |extra: &str| Attack::from_config(&on(extra)).unwrap_err();
    assert!(Attack::from_config(&config(BASE)).unwrap().is_none());
    assert!(err("  attack_type: byzantine\n").contains("no client attacks"));
    let e = err("  attack_type: poison\n  byzantine_client_num: 2\n");
    assert!(
        e.contains("attack_args.attack_type") && e.contains("label_flipping"),
        "{e}"
    );
    let e = err("  attack_mode: fuzz\n  byzantine_client_num: 2\n");
    assert!(
        e.contains("attack_args.attack_mode") && e.contains("zero"),
        "{e}"
    );
    let e = err("  attack_type: label_flipping\n  byzantine_client_num: 2\n  original_class_list: [1, 2]\n  target_class_list: [3]\n");
    assert!(e.contains("same length"), "{e}");
    let e = err("  attack_type: label_flipping\n  byzantine_client_num: 2\n  original_class_list: [1]\n  target_class_list: [12]\n");
    assert!(e.contains("class 12"), "{e}");
    let e = err("  byzantine_client_num: 11\n");
    assert!(e.contains("exceeds client_num_in_total"), "{e}");
    let e =
        err("  attack_type: model_replacement\n  byzantine_client_num: 1\n  backdoor_target: 10\n");
    assert!(e.contains("attack_args.backdoor_target"), "{e}");
    let e = err("  byzantine_client_num: 1\n  sample_boost: 0.5\n");
    assert!(e.contains("attack_args.sample_boost"), "{e}");
    let e =
        err("  byzantine_client_num: 1\n  poison_start_round_id: 5\n  poison_end_round_id: 2\n");
    assert!(e.contains("poison_end_round_id"), "{e}");
    let a = Attack::from_config(&on(
        "  attack_type: model_replacement\n  byzantine_client_num: 2\n  backdoor_target: 7\n",
    ))
    .unwrap()
    .unwrap();
    // γ = client_num_per_round / server_lr.
    assert_eq!(
        a.kind,
        AttackKind::ModelReplacement {
            norm: None,
            gamma: 10.0
        }
    );
    assert!(a.is_backdoor() && a.active(1) && a.target == 7);
}

#[test]
fn attackers_are_a_seeded_choice_every_process_agrees_on() {
    let cfg = config(&format!(
        "{BASE}attack_args:\n  enable_attack: true\n  byzantine_client_num: 3\n"
    ));
    let ranks = attacker_ranks(&cfg);
    assert_eq!(ranks.len(), 3);
    assert!(ranks.iter().all(|r| (1..=10).contains(r)));
    assert_eq!(ranks, attacker_ranks(&cfg));
    let one = config(&format!(
        "{BASE}attack_args:\n  enable_attack: true\n  malicious_client_id: 4\n"
    ));
    assert_eq!(attacker_ranks(&one), [4]);
    let ratio = config(&format!(
        "{BASE}attack_args:\n  enable_attack: true\n  ratio_of_poisoned_client: 0.2\n"
    ));
    assert_eq!(attacker_ranks(&ratio).len(), 2);
    assert!(attacker_ranks(&config(BASE)).is_empty());
}

/// Six 1×6×6 images: black, labels 0..6.
fn images() -> Arc<dyn Dataset> {
    Arc::new(
        ImageDataset::new(
            "toy",
            [1, 6, 6],
            vec![0; 6 * 36],
            vec![0, 1, 2, 3, 4, 5],
            6,
            &[0.5],
            &[0.5],
        )
        .unwrap(),
    )
}

#[test]
fn poisoned_data_relabels_and_triggers_what_the_attack_says() {
    let flipped = PoisonedDataset::label_flip(images(), &[(1, 7), (3, 0)]);
    assert_eq!(flipped.labels(), [0, 7, 2, 0, 4, 5]);

    let trigger = Trigger::new(&[0.5], &[0.5]);
    assert_eq!(trigger.bright, [1.0]);
    let own = [0, 1, 2, 3];
    let bd = PoisonedDataset::backdoor(images(), &own, 0.5, trigger.clone(), 9, 3);
    let poisoned: Vec<usize> = (0..6).filter(|&i| bd.labels()[i] == 9).collect();
    assert_eq!(poisoned.len(), 2, "half of the attacker's 4 samples");
    assert!(poisoned.iter().all(|i| own.contains(i)));
    let mut x = Vec::new();
    bd.gather_features(&[poisoned[0], 4], &mut x);
    let (a, b) = x.split_at(36);
    // Black is (0 − 0.5)/0.5 = −1; the checkerboard's 8 bright pixels are 1.
    assert_eq!(a.iter().filter(|v| **v == 1.0).count(), 8);
    assert_eq!(
        a[36 - 1 - 6 - 1],
        1.0,
        "one pixel in from the corner, diagonal"
    );
    assert!(b.iter().all(|v| *v == -1.0), "an untouched sample");

    let test = backdoor_test_set(images(), trigger, 2);
    assert_eq!(test.len(), 5, "class 2 itself is left out");
    assert!(test.labels().iter().all(|l| *l == 2));
    let mut y = Vec::new();
    test.gather_features(&[0, 4], &mut y);
    assert_eq!(y.iter().filter(|v| **v == 1.0).count(), 16);
}
