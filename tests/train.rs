//! Black-box tests of `fedmq::train` on real data: the 1,797 8×8 digit images shipped with
//! smartcore (features 0..16, 10 classes).

use anyhow::Result;
use candle_core::Device;
use fedmq::data::{DataSplit, Dataset};
use fedmq::tensor::{NamedTensor, ParamSet};
use fedmq::train::{
    evaluate, init_params, select_device, train_central, train_local, Engine, Model, ModelKind,
    OptimizerKind, TrainOptions, TrainOutcome,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// An in-memory labelled data set.
struct Mem {
    name: String,
    shape: Vec<usize>,
    classes: usize,
    x: Vec<f32>,
    y: Vec<u32>,
}

impl Dataset for Mem {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.y.len()
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn sample_shape(&self) -> &[usize] {
        &self.shape
    }
    fn labels(&self) -> &[u32] {
        &self.y
    }
    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        let d: usize = self.shape.iter().product();
        for &i in idx {
            out.extend_from_slice(&self.x[i * d..(i + 1) * d]);
        }
    }
}

/// The digits, scaled to [0, 1] then standardized with MNIST's constants (as torchvision's
/// MNIST transform), shape [1, 8, 8].
fn digits() -> Mem {
    let ds = smartcore::dataset::digits::load_dataset();
    Mem {
        name: "digits".into(),
        shape: vec![1, 8, 8],
        classes: 10,
        x: ds
            .data
            .iter()
            .map(|v| (v / 16.0 - 0.1307) / 0.3081)
            .collect(),
        y: ds.target.iter().map(|&t| t as u32).collect(),
    }
}

/// The first 80% of a fixed permutation for training, the rest held out.
fn split_indices(n: usize) -> (Vec<usize>, Vec<usize>) {
    // A fixed stride permutation (coprime with 1797) mixes the classes, which come in order.
    let order: Vec<usize> = (0..n).map(|i| (i * 997) % n).collect();
    let cut = n * 4 / 5;
    (order[..cut].to_vec(), order[cut..].to_vec())
}

fn opts(kind: ModelKind) -> TrainOptions {
    TrainOptions {
        epochs: 8,
        batch_size: 16,
        seed: 1,
        ..TrainOptions::recommended(kind)
    }
}

fn train_digits(kind: ModelKind, engine: Engine) -> Result<(f64, ParamSet)> {
    let data = digits();
    let (train, test) = split_indices(data.len());
    let (model, varmap) = Model::init_seeded(kind, &[1, 8, 8], 10, 7, &Device::Cpu)?;
    let stop = AtomicBool::new(false);
    let opts = TrainOptions {
        engine,
        ..opts(kind)
    };
    let mut epochs = Vec::new();
    let report = train_local(
        &model,
        &varmap,
        &data,
        &train,
        &opts,
        &Device::Cpu,
        &stop,
        |e| epochs.push(e.clone()),
    )?;
    assert_eq!(report.outcome, TrainOutcome::Completed);
    assert_eq!(report.epochs_completed, opts.epochs);
    assert_eq!(report.samples_seen, opts.epochs * train.len());
    assert_eq!(epochs.len(), opts.epochs);
    assert!(
        epochs.last().unwrap().mean_loss < epochs[0].mean_loss,
        "{epochs:?}"
    );
    let eval = evaluate(&model, &data, Some(&test), 64, &Device::Cpu)?;
    assert_eq!(eval.samples, test.len());
    Ok((eval.accuracy, ParamSet::from_varmap(&varmap)?))
}

#[test]
fn every_model_learns_digits_quickly() -> Result<()> {
    for kind in ModelKind::ALL {
        let start = Instant::now();
        let (acc, _) = train_digits(kind, Engine::Auto)?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!("{kind}: held-out accuracy {acc:.3} in {secs:.2}s");
        assert!(acc >= 0.9, "{kind}: held-out accuracy {acc}");
        assert!(secs < 30.0, "{kind}: {secs}s");
    }
    Ok(())
}

#[test]
fn candle_engine_learns_too() -> Result<()> {
    // candle's path (the one CUDA uses) on the CPU, for the two cheap models.
    for kind in [ModelKind::Lr, ModelKind::Mlp] {
        let (acc, _) = train_digits(kind, Engine::Candle)?;
        assert!(acc >= 0.9, "{kind} (candle): held-out accuracy {acc}");
    }
    Ok(())
}

#[test]
fn training_is_deterministic_per_seed() -> Result<()> {
    let (_, a) = train_digits(ModelKind::Mlp, Engine::Auto)?;
    let (_, b) = train_digits(ModelKind::Mlp, Engine::Auto)?;
    assert_eq!(a.digest(), b.digest());
    Ok(())
}

#[test]
fn init_is_deterministic_per_seed() -> Result<()> {
    for kind in ModelKind::ALL {
        let (m1, v1) = Model::init_seeded(kind, &[1, 28, 28], 10, 42, &Device::Cpu)?;
        let (_, v2) = Model::init_seeded(kind, &[1, 28, 28], 10, 42, &Device::Cpu)?;
        let (_, v3) = Model::init_seeded(kind, &[1, 28, 28], 10, 43, &Device::Cpu)?;
        let p1 = ParamSet::from_varmap(&v1)?;
        assert_eq!(p1.digest(), ParamSet::from_varmap(&v2)?.digest());
        assert_ne!(p1.digest(), ParamSet::from_varmap(&v3)?.digest());
        assert_eq!(p1, init_params(kind, &[1, 28, 28], 10, 42)?);
        assert_eq!(p1.num_params(), m1.num_params());
    }
    Ok(())
}

#[test]
fn interrupt_stops_between_batches() -> Result<()> {
    let data = digits();
    let all: Vec<usize> = (0..data.len()).collect();
    let (model, varmap) = Model::init_seeded(ModelKind::Lr, &[1, 8, 8], 10, 0, &Device::Cpu)?;
    let before = ParamSet::from_varmap(&varmap)?;
    let opts = TrainOptions {
        epochs: 3,
        ..opts(ModelKind::Lr)
    };

    // Raised before the start: nothing is trained.
    let stop = AtomicBool::new(true);
    let r = train_local(
        &model,
        &varmap,
        &data,
        &all,
        &opts,
        &Device::Cpu,
        &stop,
        |_| {},
    )?;
    assert_eq!(r.outcome, TrainOutcome::Interrupted);
    assert_eq!((r.epochs_completed, r.samples_seen), (0, 0));
    assert!(r.mean_loss.is_nan());
    assert_eq!(ParamSet::from_varmap(&varmap)?, before);

    // Raised at the end of the first epoch: the second stops before its first batch, and the
    // first epoch's parameters are kept.
    let stop = AtomicBool::new(false);
    let r = train_local(
        &model,
        &varmap,
        &data,
        &all,
        &opts,
        &Device::Cpu,
        &stop,
        |e| {
            assert_eq!(e.epoch, 1);
            stop.store(true, Ordering::Relaxed);
        },
    )?;
    assert_eq!(r.outcome, TrainOutcome::Interrupted);
    assert_eq!((r.epochs_completed, r.samples_seen), (1, data.len()));
    assert_ne!(ParamSet::from_varmap(&varmap)?, before);
    Ok(())
}

/// Two classes, two features; logits are set by hand.
fn toy() -> Mem {
    Mem {
        name: "toy".into(),
        shape: vec![2],
        classes: 2,
        x: vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        y: vec![0, 0, 1],
    }
}

#[test]
fn evaluate_known_answer() -> Result<()> {
    let data = toy();
    // logits = x·Wᵀ + b with W = [[2, 0], [0, 1]], b = [0, 0]:
    //   x0 = (1, 0) → (2, 0), label 0: correct, loss = ln(1 + e⁻²)
    //   x1 = (0, 1) → (0, 1), label 0: wrong,   loss = ln(1 + e¹)
    //   x2 = (1, 1) → (2, 1), label 1: wrong,   loss = ln(1 + e¹)
    let params = ParamSet::new(vec![
        NamedTensor::new("linear.weight", vec![2, 2], vec![2.0, 0.0, 0.0, 1.0])?,
        NamedTensor::new("linear.bias", vec![2], vec![0.0, 0.0])?,
    ])?;
    let want_loss = ((1.0 + (-2f64).exp()).ln() + 2.0 * (1.0 + 1f64.exp()).ln()) / 3.0;
    let (model, varmap) = Model::init_seeded(ModelKind::Lr, &[2], 2, 0, &Device::Cpu)?;
    params.load_into(&varmap)?;
    for batch in [1, 2, 64] {
        let r = evaluate(&model, &data, None, batch, &Device::Cpu)?;
        assert_eq!(r.samples, 3);
        assert!((r.accuracy - 1.0 / 3.0).abs() < 1e-12, "{r:?}");
        assert!((r.loss - want_loss).abs() < 1e-5, "{r:?} vs {want_loss}");
    }
    let r = evaluate(&model, &data, Some(&[2]), 8, &Device::Cpu)?;
    assert_eq!((r.samples, r.accuracy), (1, 0.0));
    let empty = evaluate(&model, &data, Some(&[]), 8, &Device::Cpu)?;
    assert_eq!(empty.samples, 0);
    assert!(empty.loss.is_nan());
    Ok(())
}

#[test]
fn mismatched_data_and_bad_options_are_errors() -> Result<()> {
    let data = digits();
    let (model, varmap) = Model::init_seeded(ModelKind::Lr, &[1, 28, 28], 10, 0, &Device::Cpu)?;
    let stop = AtomicBool::new(false);
    let o = TrainOptions::default();
    let err = train_local(
        &model,
        &varmap,
        &data,
        &[0],
        &o,
        &Device::Cpu,
        &stop,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("[1, 8, 8]") && err.contains("[1, 28, 28]"),
        "{err}"
    );

    let (model, varmap) = Model::init_seeded(ModelKind::Lr, &[1, 8, 8], 10, 0, &Device::Cpu)?;
    let err = train_local(
        &model,
        &varmap,
        &data,
        &[5000],
        &o,
        &Device::Cpu,
        &stop,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("5000") && err.contains("1797"), "{err}");

    let bad = TrainOptions {
        batch_size: 0,
        ..TrainOptions::default()
    };
    let err = train_local(
        &model,
        &varmap,
        &data,
        &[0],
        &bad,
        &Device::Cpu,
        &stop,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch_size"), "{err}");
    assert!("sgdx".parse::<OptimizerKind>().is_err());
    Ok(())
}

#[test]
fn adam_learns_digits() -> Result<()> {
    let data = digits();
    let (train, test) = split_indices(data.len());
    let (model, varmap) = Model::init_seeded(ModelKind::Mlp, &[1, 8, 8], 10, 3, &Device::Cpu)?;
    let opts = TrainOptions {
        optimizer: OptimizerKind::Adam,
        learning_rate: 0.001,
        momentum: 0.0,
        epochs: 5,
        batch_size: 16,
        ..TrainOptions::default()
    };
    let stop = AtomicBool::new(false);
    train_local(
        &model,
        &varmap,
        &data,
        &train,
        &opts,
        &Device::Cpu,
        &stop,
        |_| {},
    )?;
    let acc = evaluate(&model, &data, Some(&test), 64, &Device::Cpu)?.accuracy;
    assert!(acc >= 0.9, "{acc}");
    Ok(())
}

#[test]
fn central_training_reports_every_epoch() -> Result<()> {
    let data = digits();
    let (train, test) = split_indices(data.len());
    let subset = |idx: &[usize]| -> Arc<dyn Dataset> {
        let d = 64;
        Arc::new(Mem {
            name: "part".into(),
            shape: vec![1, 8, 8],
            classes: 10,
            x: idx
                .iter()
                .flat_map(|&i| data.x[i * d..(i + 1) * d].to_vec())
                .collect(),
            y: idx.iter().map(|&i| data.y[i]).collect(),
        })
    };
    let split = DataSplit {
        train: subset(&train),
        test: subset(&test),
    };
    let opts = TrainOptions {
        epochs: 3,
        ..opts(ModelKind::Mlp)
    };
    let mut seen = 0;
    let report = train_central(&split, &ModelKind::Mlp.into(), &opts, &Device::Cpu, |_| {
        seen += 1
    })?;
    assert_eq!(seen, 3);
    let last = report.epochs.last().unwrap();
    assert!(last.test_accuracy >= 0.9, "{last:?}");
    assert!(last.samples_per_s > 0.0);
    let json = serde_json::to_value(last)?;
    for key in [
        "epoch",
        "train_loss",
        "test_loss",
        "test_accuracy",
        "seconds",
        "samples_per_s",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }
    assert_eq!(report.params.num_params(), 199_210 - 784 * 200 + 64 * 200);
    Ok(())
}

#[test]
fn device_selection_without_cuda() {
    let (dev, msg) = select_device(false, 0);
    assert!(dev.is_cpu(), "{msg}");
    let (dev, msg) = select_device(true, 0);
    assert!(dev.is_cpu());
    if cfg!(not(feature = "cuda")) {
        assert!(
            msg.contains("using_gpu is true but this build has no CUDA support")
                && msg.contains("--features cuda")
                && msg.contains("scripts/build-cuda.sh")
                && msg.contains("training on CPU"),
            "{msg}"
        );
    }
}
