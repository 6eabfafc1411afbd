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
