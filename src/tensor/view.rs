//! [`ParamsView`]: a borrowed, read-only view of named f32 tensors, either over a [`ParamSet`] or
//! directly over the bytes of a safetensors blob — so a received update can be aggregated
//! without first being copied into a second model-sized buffer.

use super::param_set::{LayoutMismatch, ShapeMismatch};
use super::{Error, ParamSet, Result};
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::HashMap;

/// The values of one tensor: host f32s, or little-endian f32 bytes of a blob.
#[derive(Debug, Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Le(&'a [u8]),
}

/// One borrowed tensor.
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    name: String,
    shape: Vec<usize>,
    values: Values<'a>,
}

impl<'a> TensorView<'a> {
    /// Tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self.values {
            Values::F32(v) => v.len(),
            Values::Le(b) => b.len() / 4,
        }
    }

    /// True for a tensor with no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, in row-major order.
    pub fn values(&self) -> impl Iterator<Item = f32> + 'a {
        let (f, b): (&'a [f32], &'a [u8]) = match self.values {
            Values::F32(v) => (v, &[]),
            Values::Le(b) => (&[], b),
        };
        f.iter().copied().chain(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        )
    }

    /// Applies `f(target, value)` to each pair of `target` (same length) and this tensor's values.
    /// One tight loop per storage kind, so the compiler vectorizes it.
    pub fn zip_apply(&self, target: &mut [f32], mut f: impl FnMut(&mut f32, f32)) {
        match self.values {
            Values::F32(v) => target.iter_mut().zip(v).for_each(|(t, x)| f(t, *x)),
            Values::Le(b) => target
                .iter_mut()
                .zip(b.chunks_exact(4))
                .for_each(|(t, c)| f(t, f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        }
    }
}

/// Borrowed named f32 tensors, sorted by name.
#[derive(Debug, Clone)]
pub struct ParamsView<'a> {
    tensors: Vec<TensorView<'a>>,
}

impl<'a> ParamsView<'a> {
    /// A view of `set`.
    pub fn of(set: &'a ParamSet) -> Self {
        Self {
            tensors: set
                .iter()
                .map(|t| TensorView {
                    name: t.name().to_string(),
                    shape: t.shape().to_vec(),
                    values: Values::F32(t.data()),
                })
                .collect(),
        }
    }

    /// A view of the tensors of a safetensors blob, without copying their data.
    ///
    /// # Errors
    /// [`Error::Malformed`] for bytes that are not a valid safetensors blob,
    /// [`Error::UnsupportedDtype`] for a tensor that is not `F32`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(Error::Malformed)?;
        let mut tensors = Vec::with_capacity(st.len());
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(Error::UnsupportedDtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            // `deserialize` validated that each tensor's byte range matches its shape.
            tensors.push(TensorView {
                shape: view.shape().to_vec(),
                values: Values::Le(view.data()),
                name,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { tensors })
    }

    /// The tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorView<'a>] {
        &self.tensors
    }

    /// Splits off the tensors whose names start with `prefix` (e.g. the `strategy/` tensors an
    /// update carries beside the model): returns them with the prefix removed, and keeps the
    /// others in `self`.
    pub fn split_prefix(&mut self, prefix: &str) -> ParamsView<'a> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.tensors)
            .into_iter()
            .partition(|t| t.name.starts_with(prefix));
        self.tensors = kept;
        let mut tensors: Vec<TensorView<'a>> = taken
            .into_iter()
            .map(|mut t| {
                t.name = t.name[prefix.len()..].to_string();
                t
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        ParamsView { tensors }
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of values.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(TensorView::len).sum()
    }

    /// Checks that this view has exactly the names and shapes of `expected`, listing every
    /// difference.
    ///
    /// # Errors
    /// [`Error::Mismatch`].
    pub fn check_layout(&self, expected: &ParamSet) -> Result<()> {
        let mut report = LayoutMismatch::default();
        let ours: HashMap<&str, &TensorView> = self.tensors.iter().map(|t| (t.name(), t)).collect();
        for t in expected.iter() {
            match ours.get(t.name()) {
                None => report.missing.push(t.name().to_string()),
                Some(o) if o.shape != t.shape() => report.shapes.push(ShapeMismatch {
                    name: t.name().to_string(),
                    expected: t.shape().to_vec(),
                    got: o.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        for o in &self.tensors {
            if expected.get(o.name()).is_none() {
                report.unexpected.push(o.name.clone());
            }
        }
        if report.is_empty() {
            Ok(())
        } else {
            report.missing.sort();
            report.unexpected.sort();
            Err(Error::Mismatch(Box::new(report)))
        }
    }
}
