//! The native engine against candle's autograd on the same parameters and inputs.

use super::*;
use crate::train::model::{init_params, Model, ModelKind};
use crate::train::optim::OptimizerKind;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

fn batch(shape: &[usize], n: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let d: usize = shape.iter().product();
    let x = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let y = (0..n)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    (x, y)
}

fn close(a: f32, b: f32, what: &str) {
    let tol = 1e-4 + 1e-3 * a.abs().max(b.abs());
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

/// Loss, logits and gradients of candle's autograd, in spec order.
fn candle_reference(
    kind: ModelKind,
    shape: &[usize],
    classes: usize,
    params: &ParamSet,
    x: &[f32],
    y: &[u32],
) -> (f32, Vec<f32>, Vec<Vec<f32>>) {
    let dev = Device::Cpu;
    let varmap = params.to_varmap(&dev).unwrap();
    let model = Model::new(
        kind,
        shape,
        classes,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let mut dims = vec![y.len()];
    dims.extend_from_slice(shape);
    let xs = Tensor::from_slice(x, dims.as_slice(), &dev).unwrap();
    let ys = Tensor::from_slice(y, y.len(), &dev).unwrap();
    let logits = model.forward(&xs).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &ys).unwrap();
    let grads = loss.backward().unwrap();
    let g = model
        .tensors()
        .iter()
        .map(|t| {
            grads
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    (
        loss.to_scalar::<f32>().unwrap(),
        logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        g,
    )
}

fn check_against_candle(
    kind: ModelKind,
    shape: &[usize],
    classes: usize,
    n: usize,
    threads: usize,
) {
    let arch = Arch::new(kind, shape, classes).unwrap();
    let params = init_params(kind, shape, classes, 3).unwrap();
    let (x, y) = batch(shape, n, classes, 11);
    let (loss, logits, grads) = candle_reference(kind, shape, classes, &params, &x, &y);

    let mut net = NativeNet::new(&arch, &params, threads).unwrap();
    net.set_optimizer(OptimizerConfig {
        learning_rate: 0.0,
        ..Default::default()
    });
    net.input().clear();
    net.input().extend_from_slice(&x);
    let stats = net.train_step(&y);
    close((stats.loss_sum / n as f64) as f32, loss, "loss");
    for (i, (a, b)) in net.logits(n).iter().zip(&logits).enumerate() {
        close(*a, *b, &format!("logit {i}"));
    }
    let specs = arch.param_specs();
    for ((spec, ours), theirs) in specs.iter().zip(net.grads()).zip(&grads) {
        assert_eq!(ours.len(), theirs.len(), "{}", spec.name);
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            close(
                *a,
                *b,
                &format!("{kind} grad {}[{i}] ({threads} threads)", spec.name),
            );
        }
    }
    // lr = 0 leaves the parameters as they were.
    assert_eq!(net.param_set(), params);
}

#[test]
fn lr_matches_candle() {
    check_against_candle(ModelKind::Lr, &[1, 8, 8], 10, 7, 1);
    check_against_candle(ModelKind::Lr, &[1, 8, 8], 10, 7, 3);
}

#[test]
fn mlp_matches_candle() {
    check_against_candle(ModelKind::Mlp, &[1, 8, 8], 10, 9, 1);
    check_against_candle(ModelKind::Mlp, &[64], 4, 5, 2);
}

#[test]
fn cnn_matches_candle() {
    check_against_candle(ModelKind::Cnn, &[1, 8, 8], 10, 5, 1);
    check_against_candle(ModelKind::Cnn, &[1, 8, 8], 10, 5, 2);
    // Odd sizes (pooling floors) and several input channels.
    check_against_candle(ModelKind::Cnn, &[2, 9, 7], 3, 3, 2);
}

#[test]
fn cnn_mnist_shape_matches_candle() {
    check_against_candle(ModelKind::Cnn, &[1, 28, 28], 10, 4, 2);
}

#[test]
fn eval_matches_train_forward_and_more_shards_than_samples() {
    let (kind, shape, classes) = (ModelKind::Mlp, [1usize, 8, 8], 10);
    let arch = Arch::new(kind, &shape, classes).unwrap();
    let params = init_params(kind, &shape, classes, 5).unwrap();
    let (x, y) = batch(&shape, 2, classes, 1);
    let (loss, _, _) = candle_reference(kind, &shape, classes, &params, &x, &y);
    let mut net = NativeNet::new(&arch, &params, 4).unwrap();
    net.input().extend_from_slice(&x);
    let s = net.eval(&y);
    assert_eq!(s.samples, 2);
    close((s.loss_sum / 2.0) as f32, loss, "eval loss");
}

#[test]
fn optimizer_steps_match_the_host_kernels() {
    // One SGD-momentum step through the engine equals the kernel applied to candle's gradient.
    let (kind, shape, classes) = (ModelKind::Cnn, [1usize, 8, 8], 10);
    let arch = Arch::new(kind, &shape, classes).unwrap();
    let params = init_params(kind, &shape, classes, 9).unwrap();
    let (x, y) = batch(&shape, 6, classes, 2);
    let (_, _, grads) = candle_reference(kind, &shape, classes, &params, &x, &y);
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        let cfg = OptimizerConfig {
            kind: optimizer,
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut net = NativeNet::new(&arch, &params, 2).unwrap();
        net.set_optimizer(cfg);
        net.input().extend_from_slice(&x);
        net.train_step(&y);
        let after = net.param_set();
        for (spec, g) in arch.param_specs().iter().zip(&grads) {
            let mut p = params.get(&spec.name).unwrap().data().to_vec();
            let mut s0 = vec![0.0; p.len()];
            let mut s1 = vec![0.0; p.len()];
            match optimizer {
                OptimizerKind::Sgd => sgd_update(&cfg, &mut p, g, &mut s0),
                OptimizerKind::Adam => {
                    crate::train::optim::adam_update(&cfg, 1, &mut p, g, &mut s0, &mut s1)
                }
            }
            for (a, b) in after.get(&spec.name).unwrap().data().iter().zip(&p) {
                close(*a, *b, &spec.name);
            }
        }
    }
}

#[test]
fn a_gradient_offset_is_added_before_the_step_in_pytorch_layout() {
    // SCAFFOLD's correction: one step with offset `o` equals the kernel applied to `g + o`,
    // with `o` given in PyTorch's layout (the engine reorders conv weights internally).
    let (kind, shape, classes) = (ModelKind::Cnn, [1usize, 8, 8], 10);
    let arch = Arch::new(kind, &shape, classes).unwrap();
    let params = init_params(kind, &shape, classes, 9).unwrap();
    let (x, y) = batch(&shape, 6, classes, 2);
    let (_, _, grads) = candle_reference(kind, &shape, classes, &params, &x, &y);
    let mut offset = params.zeros_like();
    for (t, tensor) in offset.tensors_mut().enumerate() {
        for (i, v) in tensor.data_mut().iter_mut().enumerate() {
            *v = 0.01 * ((i * 7 + t) % 13) as f32 - 0.06;
        }
    }
    let cfg = OptimizerConfig {
        kind: OptimizerKind::Sgd,
        learning_rate: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let mut net = NativeNet::new(&arch, &params, 2).unwrap();
    net.set_optimizer(cfg);
    net.set_grad_offset(&offset).unwrap();
    net.input().extend_from_slice(&x);
    net.train_step(&y);
    assert_eq!(net.steps(), 1);
    let after = net.param_set();
    for (spec, g) in arch.param_specs().iter().zip(&grads) {
        let mut p = params.get(&spec.name).unwrap().data().to_vec();
        let mut g = g.clone();
        crate::train::optim::add_offset(offset.get(&spec.name).unwrap().data(), &mut g);
        let mut s0 = vec![0.0; p.len()];
        sgd_update(&cfg, &mut p, &g, &mut s0);
        for (a, b) in after.get(&spec.name).unwrap().data().iter().zip(&p) {
            close(*a, *b, &spec.name);
        }
    }
    // A wrong layout is refused.
    let wrong = ParamSet::new(vec![NamedTensor::zeros("x", vec![1])]).unwrap();
    assert!(net.set_grad_offset(&wrong).is_err());
}

// ---------------------------------------------------------------------------------------------
// The next-character LSTM (`rnn`).

use crate::data::{DataSpec, Dataset, DatasetKind, Input, Target};
use crate::train::registry::{ModelDef, ModelRef, NativePlan};
use crate::train::rnn::CharLstm;
use crate::train::{init_model, TensorOptimizer};
use std::sync::Arc;

/// The `rnn` definition and its data spec for `vocab` symbols and sequences of `seq_len`.
fn lstm_model(
    vocab: usize,
    embed: usize,
    hidden: usize,
    layers: usize,
    seq_len: usize,
) -> (ModelRef, DataSpec) {
    let def: ModelRef = Arc::new(CharLstm {
        embed,
        hidden,
        layers,
    });
    let data = DataSpec {
        input: Input::Tokens { vocab },
        sample_shape: vec![seq_len],
        target: Target::Classes { classes: vocab },
    };
    (def, data)
}

/// The plan the registry's definition chooses (and must choose) for `data`.
fn lstm_dims(def: &ModelRef, data: &DataSpec) -> LstmDims {
    match def.native_plan(data) {
        Some(plan) => match plan.0 {
            Plan::Lstm(dims) => dims,
            other => panic!("rnn got the plan {other:?}"),
        },
        None => panic!("rnn has no native plan for {data:?}"),
    }
}

/// Random token sequences `[n, T]` and next-token labels.
fn token_batch(vocab: usize, seq_len: usize, n: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let toks = (0..n * seq_len)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let labels = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    (toks, labels)
}

/// Mean loss, logits, gradients (spec order) and correct predictions by candle's autograd on
/// the registry's candle network.
fn lstm_candle_reference(
    def: &ModelRef,
    data: &DataSpec,
    params: &ParamSet,
    tokens: &[u32],
    labels: &[u32],
) -> (f32, Vec<f32>, Vec<Vec<f32>>, usize) {
    let dev = Device::Cpu;
    let (model, _varmap) = Model::load(def, data, params, &dev).unwrap();
    let n = labels.len();
    let xs = Tensor::from_slice(tokens, (n, data.sample_shape[0]), &dev).unwrap();
    let ys = Tensor::from_slice(labels, n, &dev).unwrap();
    let logits = model.forward(&xs).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &ys).unwrap();
    let grads = loss.backward().unwrap();
    let g = model
        .tensors()
        .iter()
        .map(|t| {
            grads
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let pred = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let correct = pred.iter().zip(labels).filter(|(p, y)| p == y).count();
    (
        loss.to_scalar::<f32>().unwrap(),
        logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        g,
        correct,
    )
}

fn set_tokens(net: &mut NativeNet, tokens: &[u32]) {
    net.input().clear();
    net.input().extend(tokens.iter().map(|&t| t as f32));
}

/// Largest `|a − b|` over a tensor relative to its largest `|b|`.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    diff / scale.max(1e-30)
}

/// One training pass at lr 0 against candle: loss, logits, correct predictions, every
/// gradient, and eval's loss.
fn check_lstm_against_candle(
    (def, data): &(ModelRef, DataSpec),
    n: usize,
    threads: usize,
    seed: u64,
) {
    let dims = lstm_dims(def, data);
    let params = init_model(def.as_ref(), data, seed).unwrap();
    let (toks, labels) = token_batch(dims.vocab, dims.seq_len, n, seed + 100);
    let (loss, logits, grads, correct) = lstm_candle_reference(def, data, &params, &toks, &labels);
    let mut net = NativeNet::new_lstm(&dims, &params, threads).unwrap();
    assert_eq!(net.input_len(), dims.seq_len);
    net.set_optimizer(OptimizerConfig {
        learning_rate: 0.0,
        ..Default::default()
    });
    set_tokens(&mut net, &toks);
    let stats = net.train_step(&labels);
    let what = format!("{dims:?}, batch {n}, {threads} threads");
    assert_eq!(stats.samples, n);
    close(
        (stats.loss_sum / n as f64) as f32,
        loss,
        &format!("loss, {what}"),
    );
    assert_eq!(stats.correct, correct, "correct, {what}");
    for (i, (a, b)) in net.logits(n).iter().zip(&logits).enumerate() {
        close(*a, *b, &format!("logit {i}, {what}"));
    }
    let specs = dims.param_specs();
    for ((spec, ours), theirs) in specs.iter().zip(net.grads()).zip(&grads) {
        assert_eq!(ours.len(), theirs.len(), "{}", spec.name);
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            close(*a, *b, &format!("grad {}[{i}], {what}", spec.name));
        }
        let e = rel_err(&ours, theirs);
        assert!(e < 1e-3, "grad {}: relative error {e}, {what}", spec.name);
    }
    // lr = 0 leaves the parameters as they were, names and layout included.
    assert_eq!(net.param_set(), params);
    // eval: the same forward pass.
    set_tokens(&mut net, &toks);
    let e = net.eval(&labels);
    assert_eq!((e.samples, e.correct), (n, stats.correct));
    close(e.loss_sum as f32, stats.loss_sum as f32, "eval loss");
}

#[test]
fn rnn_small_matches_candle() {
    let m = lstm_model(13, 4, 8, 2, 7);
    check_lstm_against_candle(&m, 5, 1, 1);
    check_lstm_against_candle(&m, 5, 2, 2);
    // More shards than samples, and a batch of one.
    check_lstm_against_candle(&m, 2, 3, 3);
    check_lstm_against_candle(&m, 1, 2, 4);
    // Three layers, a sequence of one step, odd sizes.
    check_lstm_against_candle(&lstm_model(11, 3, 37, 3, 9), 5, 3, 5);
    check_lstm_against_candle(&lstm_model(6, 2, 5, 1, 1), 3, 2, 6);
}

#[test]
fn rnn_shakespeare_dims_match_candle() {
    let m = lstm_model(81, 8, 256, 2, 80);
    assert_eq!(
        lstm_dims(&m.0, &m.1),
        lstm_dims(&m.0, &DatasetKind::Shakespeare.spec())
    );
    check_lstm_against_candle(&m, 10, 2, 7);
    check_lstm_against_candle(&m, 1, 2, 8);
}

#[test]
fn rnn_native_plan_only_for_token_sequences() {
    let def = CharLstm::default();
    let Some(NativePlan(Plan::Lstm(dims))) = def.native_plan(&DatasetKind::Shakespeare.spec())
    else {
        panic!("no LSTM plan for Shakespeare");
    };
    assert_eq!(
        (
            dims.vocab,
            dims.classes,
            dims.embed,
            dims.hidden,
            dims.layers,
            dims.seq_len
        ),
        (81, 81, 8, 256, 2, 80)
    );
    assert!(def
        .native_plan(&DataSpec::image(&[1, 28, 28], 10))
        .is_none());
    assert!(def
        .native_plan(&DatasetKind::Movielens100k.spec())
        .is_none());
}

/// Several optimizer steps on changing batches (sizes 4, 1, 3) through the engine and through
/// candle's autograd with the [`TensorOptimizer`]: the same losses and parameters.
#[test]
fn rnn_optimizer_steps_match_candle() {
    let (def, data) = lstm_model(13, 4, 8, 2, 7);
    let dims = lstm_dims(&def, &data);
    let params = init_model(def.as_ref(), &data, 21).unwrap();
    let mut offset = params.zeros_like();
    for (t, tensor) in offset.tensors_mut().enumerate() {
        for (i, v) in tensor.data_mut().iter_mut().enumerate() {
            *v = 0.01 * ((i * 7 + t) % 13) as f32 - 0.06;
        }
    }
    let batches: Vec<_> = [4, 1, 3, 4]
        .iter()
        .enumerate()
        .map(|(i, &n)| token_batch(dims.vocab, dims.seq_len, n, 50 + i as u64))
        .collect();
    let sgd = OptimizerConfig {
        kind: OptimizerKind::Sgd,
        learning_rate: 0.3,
        momentum: 0.9,
        weight_decay: 0.01,
        ..Default::default()
    };
    let cases = [
        (sgd, false),
        (
            OptimizerConfig {
                nesterov: true,
                proximal_mu: 0.1,
                ..sgd
            },
            true,
        ),
        (
            OptimizerConfig {
                kind: OptimizerKind::Adam,
                learning_rate: 0.01,
                weight_decay: 0.01,
                ..Default::default()
            },
            true,
        ),
    ];
    let dev = Device::Cpu;
    for (cfg, with_offset) in cases {
        let (model, varmap) = Model::load(&def, &data, &params, &dev).unwrap();
        let vars = {
            let vm = varmap.data().lock().unwrap();
            dims.param_specs()
                .iter()
                .map(|s| vm[&s.name].clone())
                .collect()
        };
        let mut opt = TensorOptimizer::new(vars, cfg).unwrap();
        let mut net = NativeNet::new_lstm(&dims, &params, 2).unwrap();
        net.set_optimizer(cfg);
        if with_offset {
            let tensors = dims
                .param_specs()
                .iter()
                .map(|s| {
                    let t = offset.get(&s.name).unwrap();
                    Tensor::from_slice(t.data(), t.shape(), &dev).unwrap()
                })
                .collect();
            opt.set_offset(tensors).unwrap();
            net.set_grad_offset(&offset).unwrap();
        }
        for (step, (toks, labels)) in batches.iter().enumerate() {
            let n = labels.len();
            let xs = Tensor::from_slice(toks, (n, dims.seq_len), &dev).unwrap();
            let ys = Tensor::from_slice(labels, n, &dev).unwrap();
            let loss = candle_nn::loss::cross_entropy(&model.forward(&xs).unwrap(), &ys).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            set_tokens(&mut net, toks);
            let stats = net.train_step(labels);
            close(
                (stats.loss_sum / n as f64) as f32,
                loss.to_scalar::<f32>().unwrap(),
                &format!("{cfg:?}: loss at step {step}"),
            );
        }
        assert_eq!(net.steps(), batches.len() as u64);
        let ours = net.param_set();
        let theirs = model.param_set().unwrap();
        for spec in dims.param_specs() {
            let (a, b) = (
                ours.get(&spec.name).unwrap().data(),
                theirs.get(&spec.name).unwrap().data(),
            );
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                close(*x, *y, &format!("{cfg:?}: {}[{i}]", spec.name));
            }
        }
    }
}

/// A token data set in memory (`gather_features` writes the ids as `f32`, as Shakespeare's).
struct TokenSet {
    vocab: usize,
    shape: Vec<usize>,
    ids: Vec<u32>,
    labels: Vec<u32>,
}

impl Dataset for TokenSet {
    fn name(&self) -> &str {
        "tokens"
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.vocab
    }
    fn sample_shape(&self) -> &[usize] {
        &self.shape
    }
    fn labels(&self) -> &[u32] {
        &self.labels
    }
    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        let t = self.shape[0];
        for &i in idx {
            out.extend(self.ids[i * t..(i + 1) * t].iter().map(|&v| v as f32));
        }
    }
    fn input(&self) -> Input {
        Input::Tokens { vocab: self.vocab }
    }
    fn gather_ids(&self, idx: &[usize], out: &mut Vec<u32>) {
        let t = self.shape[0];
        for &i in idx {
            out.extend_from_slice(&self.ids[i * t..(i + 1) * t]);
        }
    }
}

/// The trainer picks the native engine for `rnn` and it trains (two epochs of batches of 4
/// over 11 samples: a last batch of 3) and evaluates as candle does.
#[test]
fn rnn_trainer_native_matches_candle() {
    use crate::train::trainer::{evaluate, train_local, Engine, TrainOptions};
    let (def, data) = lstm_model(13, 4, 8, 2, 7);
    let params = init_model(def.as_ref(), &data, 31).unwrap();
    let (ids, labels) = token_batch(13, 7, 11, 32);
    let set = TokenSet {
        vocab: 13,
        shape: vec![7],
        ids,
        labels,
    };
    let indices: Vec<usize> = (0..11).collect();
    let dev = Device::Cpu;
    let run = |engine| {
        let (model, varmap) = Model::load(&def, &data, &params, &dev).unwrap();
        let opts = TrainOptions {
            epochs: 2,
            batch_size: 4,
            learning_rate: 0.5,
            momentum: 0.9,
            threads: 2,
            seed: 3,
            engine,
            ..TrainOptions::default()
        };
        let never = std::sync::atomic::AtomicBool::new(false);
        let report =
            train_local(&model, &varmap, &set, &indices, &opts, &dev, &never, |_| {}).unwrap();
        (report, model.param_set().unwrap(), model)
    };
    let (native, native_params, model) = run(Engine::Auto);
    let (candle, candle_params, _) = run(Engine::Candle);
    assert!(model.native_plan().is_some());
    assert_eq!(native.steps, 6);
    assert_eq!(native.samples_seen, candle.samples_seen);
    close(
        native.mean_loss as f32,
        candle.mean_loss as f32,
        "mean loss",
    );
    for spec in def.params(&data).unwrap() {
        let (a, b) = (
            native_params.get(&spec.name).unwrap().data(),
            candle_params.get(&spec.name).unwrap().data(),
        );
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            close(*x, *y, &format!("trained {}[{i}]", spec.name));
        }
    }
    // evaluate runs the native engine (batches of 4: a last one of 3); candle on all 11.
    let report = evaluate(&model, &set, None, 4, &dev).unwrap();
    let (loss, _, _, correct) =
        lstm_candle_reference(&def, &data, &native_params, &set.ids, &set.labels);
    close(report.loss as f32, loss, "evaluate loss");
    close(
        report.accuracy as f32,
        correct as f32 / 11.0,
        "evaluate accuracy",
    );
}
