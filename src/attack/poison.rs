//! Poisoned training data: relabelled classes and the backdoor trigger, as a [`Dataset`] over
//! the client's real one (no copy of the features).

use crate::data::Dataset;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// The backdoor trigger: a 4×4 checkerboard of bright pixels one pixel in from an image's
/// bottom-right corner, in every channel (a corner MNIST digits leave black).
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// The normalized value of a bright pixel, per channel (`(1 − mean) / std`).
    pub bright: Vec<f32>,
}

/// Side of the trigger's square, in pixels.
const SIDE: usize = 4;

impl Trigger {
    /// The trigger for images normalized with per-channel `mean` and `std`.
    pub fn new(mean: &[f32], std: &[f32]) -> Self {
        Self {
            bright: mean.iter().zip(std).map(|(m, s)| (1.0 - m) / s).collect(),
        }
    }

    /// Stamps the trigger onto one image of `shape` (`[channels, height, width]`), given as its
    /// normalized features. Images smaller than the pattern are left alone.
    pub fn stamp(&self, shape: &[usize], image: &mut [f32]) {
        let [c, h, w] = match shape {
            [c, h, w] => [*c, *h, *w],
            _ => return,
        };
        if h < SIDE + 1 || w < SIDE + 1 || image.len() != c * h * w {
            return;
        }
        for ch in 0..c {
            let v = self.bright.get(ch).copied().unwrap_or(1.0);
            for i in 0..SIDE {
                for j in 0..SIDE {
                    if (i + j) % 2 == 0 {
                        let (y, x) = (h - 1 - SIDE + i, w - 1 - SIDE + j);
                        image[ch * h * w + y * w + x] = v;
                    }
                }
            }
        }
    }
}

/// A data set as an attacker trains on it: some labels changed, some samples triggered.
pub struct PoisonedDataset {
    inner: Arc<dyn Dataset>,
    name: String,
    /// Every sample of `inner`, or the listed ones (a test set without the target class).
    index: Option<Vec<usize>>,
    labels: Vec<u32>,
    triggered: Vec<bool>,
    trigger: Option<Trigger>,
}

impl PoisonedDataset {
    /// `inner` with class `from` relabelled `to`, for each pair.
    pub fn label_flip(inner: Arc<dyn Dataset>, pairs: &[(u32, u32)]) -> Self {
        let labels = inner
            .labels()
            .iter()
            .map(|&l| {
                pairs
                    .iter()
                    .find(|(from, _)| *from == l)
                    .map_or(l, |(_, to)| *to)
            })
            .collect();
        Self {
            name: format!("{} (labels flipped)", inner.name()),
            index: None,
            triggered: vec![false; inner.len()],
            labels,
            trigger: None,
            inner,
        }
    }

    /// `inner` where a `frac` of the samples `own` (the attacker's partition), drawn with
    /// `seed`, carry `trigger` and the label `target`.
    pub fn backdoor(
        inner: Arc<dyn Dataset>,
        own: &[usize],
        frac: f64,
        trigger: Trigger,
        target: u32,
        seed: u64,
    ) -> Self {
        let mut labels = inner.labels().to_vec();
        let mut triggered = vec![false; inner.len()];
        let mut pick = own.to_vec();
        pick.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let k = ((own.len() as f64) * frac).round() as usize;
        for &i in pick.iter().take(k) {
            triggered[i] = true;
            labels[i] = target;
        }
        Self {
            name: format!("{} (backdoored)", inner.name()),
            index: None,
            labels,
            triggered,
            trigger: Some(trigger),
            inner,
        }
    }
}

/// The test set of a backdoor's success: every test sample whose true class is not `target`,
/// with the trigger, labelled `target`. A model's accuracy on it is the attack's success rate.
pub fn backdoor_test_set(test: Arc<dyn Dataset>, trigger: Trigger, target: u32) -> PoisonedDataset {
    let index: Vec<usize> = (0..test.len())
        .filter(|&i| test.labels()[i] != target)
        .collect();
    PoisonedDataset {
        name: format!("{} (triggered)", test.name()),
        labels: vec![target; index.len()],
        triggered: vec![true; index.len()],
        index: Some(index),
        trigger: Some(trigger),
        inner: test,
    }
}

impl Dataset for PoisonedDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    fn sample_shape(&self) -> &[usize] {
        self.inner.sample_shape()
    }

    fn labels(&self) -> &[u32] {
        &self.labels
    }

    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        let start = out.len();
        match &self.index {
            Some(map) => {
                let inner: Vec<usize> = idx.iter().map(|&i| map[i]).collect();
                self.inner.gather_features(&inner, out);
            }
            None => self.inner.gather_features(idx, out),
        }
        let Some(trigger) = &self.trigger else {
            return;
        };
        let per: usize = self.sample_shape().iter().product();
        for (k, &i) in idx.iter().enumerate() {
            if self.triggered[i] {
                let at = start + k * per;
                trigger.stamp(self.inner.sample_shape(), &mut out[at..at + per]);
            }
        }
    }
}
