//! IDX files (the MNIST format), raw or gzipped.
//!
//! An IDX file is a 4-byte magic number `00 00 <dtype> <ndims>`, then `ndims` big-endian `u32`
//! dimension sizes, then the elements in row-major order. fedmq reads unsigned-byte files only
//! (dtype `0x08`: MNIST, Fashion-MNIST). A gzipped file (first bytes `1f 8b`) is inflated first. The
//! length must match the header exactly: a short file is [`Error::Truncated`], a long one
//! [`Error::TrailingBytes`].

use super::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// IDX element type of unsigned bytes, the only one fedmq reads.
pub const IDX_DTYPE_U8: u8 = 0x08;

/// The two magic bytes that start a gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A parsed unsigned-byte IDX array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimension sizes from the header, outermost first (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
    /// The elements, row-major; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

impl IdxArray {
    /// Number of items along the first dimension (samples).
    pub fn len(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }

    /// True when the first dimension is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True when `bytes` start with the gzip magic `1f 8b`.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

/// Parses an IDX file held in memory, inflating it first when it is gzipped.
///
/// `name` identifies the bytes in errors (usually the file path).
///
/// # Errors
/// [`Error::BadMagic`], [`Error::UnsupportedDtype`], [`Error::Truncated`],
/// [`Error::TrailingBytes`], or [`Error::Io`] when a gzip stream is corrupt.
pub fn parse_idx(bytes: &[u8], name: &str) -> Result<IdxArray> {
    if is_gzip(bytes) {
        let mut raw = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .map_err(|e| Error::io("decompress (gzip)", name, e))?;
        parse_raw(&raw, Path::new(name))
    } else {
        parse_raw(bytes, Path::new(name))
    }
}

/// Reads and parses an IDX file, raw or gzipped.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, otherwise as [`parse_idx`].
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    parse_idx(&bytes, &path.display().to_string())
}

/// Reads an IDX file of images: three dimensions `[n, rows, cols]`.
///
/// # Errors
/// As [`read_idx`], plus [`Error::BadDims`] when the file is not three-dimensional.
pub fn read_idx_images(path: &Path) -> Result<IdxArray> {
    let a = read_idx(path)?;
    check_dims(&a, 3, "images", path)?;
    Ok(a)
}

/// Reads an IDX file of labels: one dimension `[n]`.
///
/// # Errors
/// As [`read_idx`], plus [`Error::BadDims`] when the file is not one-dimensional.
pub fn read_idx_labels(path: &Path) -> Result<IdxArray> {
    let a = read_idx(path)?;
    check_dims(&a, 1, "labels", path)?;
    Ok(a)
}

/// Checks that `a` has `expected` dimensions.
pub(crate) fn check_dims(
    a: &IdxArray,
    expected: usize,
    what: &'static str,
    path: &Path,
) -> Result<()> {
    if a.dims.len() == expected {
        Ok(())
    } else {
        Err(Error::BadDims {
            path: path.to_path_buf(),
            what,
            expected,
            found: a.dims.len(),
        })
    }
}

/// Parses uncompressed IDX bytes.
fn parse_raw(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    let path_buf = || PathBuf::from(path);
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[3] == 0 {
        return Err(Error::BadMagic {
            path: path_buf(),
            found: bytes.iter().take(4).copied().collect(),
        });
    }
    let dtype = bytes[2];
    match dtype {
        IDX_DTYPE_U8 => {}
        0x09 | 0x0B | 0x0C | 0x0D | 0x0E => {
            return Err(Error::UnsupportedDtype {
                path: path_buf(),
                dtype,
            })
        }
        _ => {
            return Err(Error::BadMagic {
                path: path_buf(),
                found: bytes[..4].to_vec(),
            })
        }
    }
    let ndims = usize::from(bytes[3]);
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(Error::Truncated {
            path: path_buf(),
            expected: header as u64,
            got: bytes.len() as u64,
        });
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    // u64 arithmetic: at most 255 factors of < 2^32 can overflow, which no real file reaches; a
    // header that overflows is reported as an impossible (truncated) length.
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let expected = elements.saturating_add(header as u64);
    let got = bytes.len() as u64;
    if got < expected {
        return Err(Error::Truncated {
            path: path_buf(),
            expected,
            got,
        });
    }
    if got > expected {
        return Err(Error::TrailingBytes {
            path: path_buf(),
            expected,
            got,
        });
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Encodes `data` with `dims` as an unsigned-byte IDX file (for tests, tools and hand-made sets).
///
/// # Errors
/// [`Error::InvalidDataset`] when `data.len()` is not the product of `dims`, there are no or more
/// than 255 dimensions, or a dimension does not fit in a `u32`.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Result<Vec<u8>> {
    let invalid = |reason: String| Error::InvalidDataset {
        name: "IDX encoder".into(),
        reason,
    };
    if dims.iter().product::<usize>() != data.len() {
        return Err(invalid(format!(
            "dimensions {dims:?} need {} elements, got {}",
            dims.iter().product::<usize>(),
            data.len()
        )));
    }
    let ndims = u8::try_from(dims.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            invalid(format!(
                "an IDX file has 1 to 255 dimensions, got {}",
                dims.len()
            ))
        })?;
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&[0, 0, IDX_DTYPE_U8, ndims]);
    for &d in dims {
        let d = u32::try_from(d)
            .map_err(|_| invalid(format!("dimension {d} does not fit in a u32")))?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzipped() {
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let raw = encode_idx(&[2, 3, 4], &data).unwrap();
        for bytes in [raw.clone(), gzip(&raw)] {
            let a = parse_idx(&bytes, "t").unwrap();
            assert_eq!(a.dims, vec![2, 3, 4]);
            assert_eq!(a.data, data);
            assert_eq!(a.len(), 2);
        }
    }

    #[test]
    fn truncated_and_trailing() {
        let raw = encode_idx(&[5], &[1, 2, 3, 4, 5]).unwrap();
        let err = parse_idx(&raw[..raw.len() - 2], "labels.idx").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated {
                    expected: 13,
                    got: 11,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("labels.idx"));
        let mut long = raw.clone();
        long.push(0);
        let err = parse_idx(&long, "labels.idx").unwrap_err();
        assert!(
            matches!(
                err,
                Error::TrailingBytes {
                    expected: 13,
                    got: 14,
                    ..
                }
            ),
            "{err:?}"
        );
        // Header itself cut short.
        let err = parse_idx(&raw[..6], "h").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated {
                    expected: 8,
                    got: 6,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bad_magic_and_dtype() {
        let err = parse_idx(&[1, 0, 8, 1, 0, 0, 0, 0], "x.idx").unwrap_err();
        assert!(matches!(err, Error::BadMagic { .. }));
        let err = parse_idx(&[0, 0], "x.idx").unwrap_err();
        assert!(matches!(err, Error::BadMagic { .. }));
        let err = parse_idx(&[0, 0, 8, 0], "x.idx").unwrap_err();
        assert!(matches!(err, Error::BadMagic { .. }), "0 dims");
        let err = parse_idx(&[0, 0, 0x0D, 1, 0, 0, 0, 0], "f.idx").unwrap_err();
        assert!(matches!(err, Error::UnsupportedDtype { dtype: 0x0D, .. }));
        let msg = err.to_string();
        assert!(msg.contains("f.idx") && msg.contains("f32") && msg.contains("unsupported"));
    }

    #[test]
    fn corrupt_gzip_is_io_error() {
        let mut gz = gzip(&encode_idx(&[3], &[1, 2, 3]).unwrap());
        let n = gz.len();
        gz.truncate(n - 10);
        let err = parse_idx(&gz, "c.gz").unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("c.gz"));
    }

    #[test]
    fn huge_header_does_not_allocate() {
        let mut b = vec![0, 0, 8, 3];
        for _ in 0..3 {
            b.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert!(matches!(
            parse_idx(&b, "big").unwrap_err(),
            Error::Truncated { .. }
        ));
    }
}
