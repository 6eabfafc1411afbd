//! [`ParamSet`]: named f32 host tensors, ordered by name, with safetensors and `VarMap`
//! conversions.

use super::{Digest, Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One named f32 tensor in host memory: row-major data and its shape.
///
/// Name and shape are fixed at construction so that a [`ParamSet`] stays sorted and consistent;
/// the data is freely mutable through [`NamedTensor::data_mut`].
#[derive(Clone, PartialEq)]
pub struct NamedTensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl NamedTensor {
    /// A tensor named `name` of shape `shape` holding `data` (row-major).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `data.len()` is not the product of `shape`.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let name = name.into();
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::LengthMismatch {
                name,
                shape,
                expected,
                got: data.len(),
            });
        }
        Ok(Self { name, shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            name: name.into(),
            shape,
            data: vec![0.0; n],
        }
    }

    /// The tensor's name, e.g. `fc1.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, mutable (for in-place aggregation and optimizers).
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True for a tensor with a zero-sized dimension.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Consumes the tensor, giving its data.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The raw little-endian bytes of the data, borrowed where the host is little-endian.
    fn le_bytes(&self) -> Cow<'_, [u8]> {
        #[cfg(target_endian = "little")]
        {
            // SAFETY: f32 has no invalid bit patterns and no padding, u8 has alignment 1, and the
            // byte length is exactly `4 * len` of the same allocation, borrowed for `&self`. On a
            // little-endian host the in-memory bytes are the little-endian encoding.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    self.data.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(self.data.as_slice()),
                )
            };
            Cow::Borrowed(bytes)
        }
        #[cfg(not(target_endian = "little"))]
        {
            Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
    }
}

impl fmt::Debug for NamedTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedTensor")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("len", &self.data.len())
            .finish()
    }
}

impl View for &NamedTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.le_bytes()
    }
    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }
}

/// A model's parameters in host memory: named f32 tensors, sorted by name, names unique.
///
/// Equal parameter sets encode to equal safetensors bytes, hence equal [`Digest`]s, and decoding
/// gives back the exact bits (NaN payloads and signed zeros included).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ParamSet {
    /// Invariant: sorted by name, names unique.
    tensors: Vec<NamedTensor>,
}

impl ParamSet {
    /// A set of the given tensors (in any order).
    ///
    /// # Errors
    /// [`Error::DuplicateName`] when two tensors share a name.
    pub fn new(mut tensors: Vec<NamedTensor>) -> Result<Self> {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::DuplicateName(w[0].name.clone()));
        }
        Ok(Self { tensors })
    }

    /// Copies every variable of `varmap` to the host.
    ///
    /// # Errors
    /// [`Error::UnsupportedDtype`] for a non-f32 variable; [`Error::Candle`] if a device read fails.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let vars = lock_vars(varmap);
        let mut tensors = Vec::with_capacity(vars.len());
        for (name, var) in vars.iter() {
            let t = var.as_tensor();
            if t.dtype() != DType::F32 {
                return Err(Error::UnsupportedDtype {
                    name: name.clone(),
                    dtype: format!("{:?}", t.dtype()).to_uppercase(),
                });
            }
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            tensors.push(NamedTensor {
                name: name.clone(),
                shape: t.dims().to_vec(),
                data,
            });
        }
        drop(vars);
        // Names of a HashMap are unique.
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { tensors })
    }

    /// A new `VarMap` on `device` holding a copy of these parameters.
    ///
    /// # Errors
    /// [`Error::Candle`] if allocating on the device fails.
    pub fn to_varmap(&self, device: &Device) -> Result<VarMap> {
        let varmap = VarMap::new();
        {
            let mut vars = lock_vars(&varmap);
            for t in &self.tensors {
                let tensor = Tensor::from_slice(&t.data, t.shape.as_slice(), device)?;
                vars.insert(t.name.clone(), Var::from_tensor(&tensor)?);
            }
        }
        Ok(varmap)
    }

    /// Overwrites the variables of `varmap` with these parameters.
    ///
    /// Nothing is written unless the layouts match exactly: same names, same shapes, f32.
    ///
    /// # Errors
    /// [`Error::Mismatch`] listing *every* missing name, unexpected name, shape and dtype
    /// difference; [`Error::Candle`] if a device write fails.
    pub fn load_into(&self, varmap: &VarMap) -> Result<()> {
        let vars = lock_vars(varmap);
        let mut report = LayoutMismatch::default();
        for (name, var) in vars.iter() {
            match self.get(name) {
                None => report.missing.push(name.clone()),
                Some(t) => {
                    if var.dims() != t.shape() {
                        report.shapes.push(ShapeMismatch {
                            name: name.clone(),
                            expected: var.dims().to_vec(),
                            got: t.shape.clone(),
                        });
                    }
                    if var.dtype() != DType::F32 {
                        report
                            .dtypes
                            .push((name.clone(), format!("{:?}", var.dtype()).to_uppercase()));
                    }
                }
            }
        }
        for t in &self.tensors {
            if !vars.contains_key(&t.name) {
                report.unexpected.push(t.name.clone());
            }
        }
        if !report.is_empty() {
            report.sort();
            return Err(Error::Mismatch(Box::new(report)));
        }
        for t in &self.tensors {
            // Present: checked above.
            let Some(var) = vars.get(&t.name) else {
                continue;
            };
            let value = Tensor::from_slice(&t.data, t.shape.as_slice(), var.device())?;
            var.set(&value)?;
        }
        Ok(())
    }

    /// Checks that `other` has the same names and shapes, listing every difference.
    ///
    /// # Errors
    /// [`Error::Mismatch`] where `self` is the expected layout.
    pub fn check_same_layout(&self, other: &ParamSet) -> Result<()> {
        let mut report = LayoutMismatch::default();
        let theirs: HashMap<&str, &NamedTensor> =
            other.tensors.iter().map(|t| (t.name(), t)).collect();
        for t in &self.tensors {
            match theirs.get(t.name()) {
                None => report.missing.push(t.name.clone()),
                Some(o) if o.shape != t.shape => report.shapes.push(ShapeMismatch {
                    name: t.name.clone(),
                    expected: t.shape.clone(),
                    got: o.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        for o in &other.tensors {
            if self.get(o.name()).is_none() {
                report.unexpected.push(o.name.clone());
            }
        }
        if report.is_empty() {
            Ok(())
        } else {
            report.sort();
            Err(Error::Mismatch(Box::new(report)))
        }
    }

    /// Encodes as a safetensors blob in memory (all tensors `F32`, no metadata).
    ///
    /// Deterministic: equal parameter sets give equal bytes.
    pub fn to_safetensors_bytes(&self) -> Vec<u8> {
        match safetensors::serialize(self.tensors.iter().map(|t| (t.name(), t)), None) {
            Ok(bytes) => bytes,
            // Serialization only fails for a header over 100 MB (millions of tensors) or a view
            // whose data length disagrees with its shape; `NamedTensor::new` rules out the latter.
            Err(e) => panic!("safetensors serialization of a valid ParamSet failed: {e}"),
        }
    }

    /// Encodes this set and `extra` (whose names are given `prefix`) as one safetensors blob,
    /// without copying either: how a global model travels with its strategy's tensors.
    pub fn to_safetensors_bytes_with(&self, prefix: &str, extra: &ParamSet) -> Vec<u8> {
        let named: Vec<(String, &NamedTensor)> = self
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t))
            .chain(
                extra
                    .tensors
                    .iter()
                    .map(|t| (format!("{prefix}{}", t.name), t)),
            )
            .collect();
        match safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), *t)), None) {
            Ok(bytes) => bytes,
            Err(e) => panic!("safetensors serialization of a valid ParamSet failed: {e}"),
        }
    }

    /// Removes the tensors whose names start with `prefix` and returns them with the prefix
    /// removed (the strategy's tensors a model blob carries).
    pub fn split_prefix(&mut self, prefix: &str) -> ParamSet {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.tensors)
            .into_iter()
            .partition(|t| t.name.starts_with(prefix));
        self.tensors = kept;
        let mut tensors: Vec<NamedTensor> = taken
            .into_iter()
            .map(|mut t| {
                t.name = t.name[prefix.len()..].to_string();
                t
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        ParamSet { tensors }
    }

    /// Decodes a safetensors blob whose tensors are all `F32`.
    ///
    /// # Errors
    /// [`Error::Malformed`] for bytes that are not a valid safetensors blob,
    /// [`Error::UnsupportedDtype`] for a tensor of another dtype.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(Error::Malformed)?;
        let mut tensors = Vec::with_capacity(st.len());
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(Error::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // `deserialize` validated that each tensor's byte range matches its shape.
            tensors.push(NamedTensor {
                name: name.to_string(),
                shape: view.shape().to_vec(),
                data,
            });
        }
        // Names of a JSON object header are unique after parsing.
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { tensors })
    }

    /// The SHA-256 of [`to_safetensors_bytes`](Self::to_safetensors_bytes).
    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.to_safetensors_bytes())
    }

    /// A set with the same names and shapes, all zeros (e.g. an aggregation accumulator).
    pub fn zeros_like(&self) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|t| NamedTensor::zeros(t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// The tensors, sorted by name.
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    /// The tensors, sorted by name, with mutable data (names and shapes stay fixed).
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut NamedTensor> {
        self.tensors.iter_mut()
    }

    /// Iterates over the tensors, sorted by name.
    pub fn iter(&self) -> std::slice::Iter<'_, NamedTensor> {
        self.tensors.iter()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// Bytes of raw parameter data, `4 × num_params()` (the safetensors blob adds a small JSON
    /// header to this).
    pub fn byte_len(&self) -> usize {
        4 * self.num_params()
    }
}

impl<'a> IntoIterator for &'a ParamSet {
    type Item = &'a NamedTensor;
    type IntoIter = std::slice::Iter<'a, NamedTensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}

fn lock_vars(varmap: &VarMap) -> std::sync::MutexGuard<'_, HashMap<String, Var>> {
    // A poisoned lock only means another thread panicked while holding it; the map itself
    // (names → reference-counted vars) stays consistent, so keep going.
    varmap.data().lock().unwrap_or_else(|e| e.into_inner())
}

/// One tensor whose shape differs between an expected and a received layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// Tensor name.
    pub name: String,
    /// Shape in the expected layout (the model / `VarMap` / reference set).
    pub expected: Vec<usize>,
    /// Shape in the received parameters.
    pub got: Vec<usize>,
}

/// Every difference between an expected parameter layout and a received one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutMismatch {
    /// Names expected but not received, sorted.
    pub missing: Vec<String>,
    /// Names received but not expected, sorted.
    pub unexpected: Vec<String>,
    /// Tensors present in both with different shapes, sorted by name.
    pub shapes: Vec<ShapeMismatch>,
    /// Expected tensors that are not f32: (name, dtype), sorted by name.
    pub dtypes: Vec<(String, String)>,
}

impl LayoutMismatch {
    /// True when nothing differs.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.shapes.is_empty()
            && self.dtypes.is_empty()
    }

    fn sort(&mut self) {
        self.missing.sort();
        self.unexpected.sort();
        self.shapes.sort_by(|a, b| a.name.cmp(&b.name));
        self.dtypes.sort();
    }
}

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing [{}]", self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected [{}]", self.unexpected.join(", ")));
        }
        if !self.shapes.is_empty() {
            let s: Vec<String> = self
                .shapes
                .iter()
                .map(|m| format!("{}: expected {:?}, got {:?}", m.name, m.expected, m.got))
                .collect();
            parts.push(format!("shape mismatch [{}]", s.join("; ")));
        }
        if !self.dtypes.is_empty() {
            let s: BTreeMap<&str, &str> = self
                .dtypes
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_str()))
                .collect();
            let s: Vec<String> = s.iter().map(|(n, d)| format!("{n}: {d}")).collect();
            parts.push(format!("not f32 [{}]", s.join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(specs: &[(&str, &[usize])]) -> ParamSet {
        ParamSet::new(
            specs
                .iter()
                .map(|(n, s)| NamedTensor::zeros(*n, s.to_vec()))
                .collect(),
        )
        .unwrap()
    }

    fn arb_param_set() -> impl Strategy<Value = ParamSet> {
        let tensor = (
            "[a-z][a-z0-9_.]{0,12}",
            prop::collection::vec(0usize..5, 0..4),
        )
            .prop_flat_map(|(name, shape)| {
                let n: usize = shape.iter().product();
                // Any bit pattern, NaNs and subnormals included.
                let data = prop::collection::vec(any::<u32>().prop_map(f32::from_bits), n);
                (Just(name), Just(shape), data)
            });
        prop::collection::btree_map("[a-z][a-z0-9_.]{0,12}", tensor, 0..6).prop_map(|m| {
            ParamSet::new(
                m.into_iter()
                    .map(|(name, (_, shape, data))| NamedTensor::new(name, shape, data).unwrap())
                    .collect(),
            )
            .unwrap()
        })
    }

    fn bits(p: &ParamSet) -> Vec<(String, Vec<usize>, Vec<u32>)> {
        p.iter()
            .map(|t| {
                (
                    t.name().to_string(),
                    t.shape().to_vec(),
                    t.data().iter().map(|v| v.to_bits()).collect(),
                )
            })
            .collect()
    }

    proptest! {
        #[test]
        fn safetensors_round_trip_is_bit_exact(p in arb_param_set()) {
            let bytes = p.to_safetensors_bytes();
            let back = ParamSet::from_safetensors_bytes(&bytes).unwrap();
            prop_assert_eq!(bits(&back), bits(&p));
            // Deterministic bytes: re-encoding gives the same blob and digest.
            prop_assert_eq!(back.to_safetensors_bytes(), bytes);
            prop_assert_eq!(back.digest(), p.digest());
        }

        #[test]
        fn varmap_round_trip_is_bit_exact(p in arb_param_set()) {
            let vm = p.to_varmap(&Device::Cpu).unwrap();
            let back = ParamSet::from_varmap(&vm).unwrap();
            prop_assert_eq!(bits(&back), bits(&p));
            let zeros = p.zeros_like();
            zeros.load_into(&vm).unwrap();
            prop_assert_eq!(bits(&ParamSet::from_varmap(&vm).unwrap()), bits(&zeros));
        }

        #[test]
        fn malformed_bytes_are_errors_not_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = ParamSet::from_safetensors_bytes(&bytes);
        }

        #[test]
        fn truncated_or_corrupted_blobs_are_errors(p in arb_param_set(), cut in 0usize..1000, flip in any::<(usize, u8)>()) {
            let bytes = p.to_safetensors_bytes();
            let cut = cut % bytes.len();
            prop_assert!(ParamSet::from_safetensors_bytes(&bytes[..cut]).is_err());
            let mut corrupt = bytes.clone();
            let i = flip.0 % corrupt.len();
            corrupt[i] ^= flip.1 | 1;
            let _ = ParamSet::from_safetensors_bytes(&corrupt);
        }
    }

    #[test]
    fn empty_set_round_trips() {
        let p = ParamSet::default();
        let back = ParamSet::from_safetensors_bytes(&p.to_safetensors_bytes()).unwrap();
        assert!(back.is_empty());
    }

    #[test]
    fn counts() {
        let p = set(&[("a", &[2, 3]), ("b", &[4])]);
        assert_eq!(p.num_params(), 10);
        assert_eq!(p.byte_len(), 40);
        assert_eq!(p.len(), 2);
        assert_eq!(p.get("b").unwrap().shape(), &[4]);
        assert!(p.get("c").is_none());
    }

    #[test]
    fn sorted_and_unique() {
        let p = set(&[("z", &[1]), ("a", &[1]), ("m", &[1])]);
        let names: Vec<_> = p.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["a", "m", "z"]);
        let dup = ParamSet::new(vec![
            NamedTensor::zeros("a", vec![1]),
            NamedTensor::zeros("a", vec![2]),
        ]);
        assert!(matches!(dup, Err(Error::DuplicateName(n)) if n == "a"));
        assert!(matches!(
            NamedTensor::new("x", vec![2, 2], vec![0.0; 3]),
            Err(Error::LengthMismatch {
                expected: 4,
                got: 3,
                ..
            })
        ));
    }

    #[test]
    fn load_into_reports_every_difference() {
        let model = set(&[
            ("a", &[2]),
            ("b", &[3, 3]),
            ("c", &[1]),
            ("d", &[4]),
            ("e", &[5]),
        ]);
        let vm = model.to_varmap(&Device::Cpu).unwrap();
        let received = set(&[
            ("a", &[2]),
            ("b", &[3, 4]),
            ("d", &[2, 2]),
            ("x", &[1]),
            ("y", &[1]),
        ]);
        let err = received.load_into(&vm).unwrap_err();
        let Error::Mismatch(report) = &err else {
            panic!("expected a mismatch, got {err}");
        };
        assert_eq!(report.missing, ["c", "e"]);
        assert_eq!(report.unexpected, ["x", "y"]);
        assert_eq!(
            report.shapes,
            [
                ShapeMismatch {
                    name: "b".into(),
                    expected: vec![3, 3],
                    got: vec![3, 4]
                },
                ShapeMismatch {
                    name: "d".into(),
                    expected: vec![4],
                    got: vec![2, 2]
                },
            ]
        );
        let msg = err.to_string();
        for needle in [
            "c",
            "e",
            "x",
            "y",
            "b: expected [3, 3], got [3, 4]",
            "d: expected [4], got [2, 2]",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
        // Nothing was written.
        assert_eq!(ParamSet::from_varmap(&vm).unwrap(), model);
        // The same report from a host-side comparison.
        let Err(Error::Mismatch(r2)) = model.check_same_layout(&received) else {
            panic!("expected a mismatch");
        };
        assert_eq!(r2, *report);
    }

    #[test]
    fn load_into_reports_non_f32_vars() {
        let vm = VarMap::new();
        vm.data()
            .lock()
            .unwrap()
            .insert("h".into(), Var::zeros(2, DType::F16, &Device::Cpu).unwrap());
        let err = set(&[("h", &[2])]).load_into(&vm).unwrap_err();
        assert!(err.to_string().contains("h: F16"), "{err}");
        assert!(matches!(
            ParamSet::from_varmap(&vm),
            Err(Error::UnsupportedDtype { .. })
        ));
    }

    #[test]
    fn non_f32_blob_is_rejected() {
        let data = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(Dtype::I32, vec![1], &data).unwrap();
        let bytes = safetensors::serialize([("w", view)], None).unwrap();
        let err = ParamSet::from_safetensors_bytes(&bytes).unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedDtype { name, dtype } if name == "w" && dtype == "I32"),
            "{err}"
        );
    }

    #[test]
    fn malformed_blob_gives_clear_error() {
        let err = ParamSet::from_safetensors_bytes(b"not a blob").unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
        assert!(err.to_string().starts_with("malformed safetensors blob"));
    }

    #[test]
    fn candle_reads_our_bytes() {
        let p = ParamSet::new(vec![NamedTensor::new(
            "w",
            vec![2, 2],
            vec![1.0, -2.0, 3.5, 0.25],
        )
        .unwrap()])
        .unwrap();
        let m =
            candle_core::safetensors::load_buffer(&p.to_safetensors_bytes(), &Device::Cpu).unwrap();
        assert_eq!(m["w"].to_vec2::<f32>().unwrap(), [[1.0, -2.0], [3.5, 0.25]]);
    }
}
