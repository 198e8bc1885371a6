//! Tensors with the KServe v2 / Open Inference Protocol datatypes.
//!
//! A [`Tensor`] is an `ndarray` array of one of the thirteen protocol datatypes. Everything
//! that moves tensors around (the HTTP layer, the batcher, the backends) goes through the
//! few operations here: build from a flat buffer, read the raw little-endian bytes Triton's
//! binary extension uses, concatenate and split along the batch axis.

use std::fmt;
use std::str::FromStr;

use half::f16;
use ndarray::{ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};

/// The datatypes of the KServe v2 protocol, with their wire names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "UINT8")]
    Uint8,
    #[serde(rename = "UINT16")]
    Uint16,
    #[serde(rename = "UINT32")]
    Uint32,
    #[serde(rename = "UINT64")]
    Uint64,
    #[serde(rename = "INT8")]
    Int8,
    #[serde(rename = "INT16")]
    Int16,
    #[serde(rename = "INT32")]
    Int32,
    #[serde(rename = "INT64")]
    Int64,
    #[serde(rename = "FP16")]
    Fp16,
    #[serde(rename = "FP32")]
    Fp32,
    #[serde(rename = "FP64")]
    Fp64,
    #[serde(rename = "BYTES")]
    Bytes,
}

impl DataType {
    /// Every datatype, in protocol order.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol name (`"FP32"`, `"BYTES"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Size of one element in bytes; `None` for variable-length `BYTES`.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of the protocol's datatype names.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown datatype {0:?}; expected one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES"
)]
pub struct UnknownDataType(pub String);

impl FromStr for DataType {
    type Err = UnknownDataType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DataType::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDataType(s.chars().take(32).collect()))
    }
}

/// What went wrong building, joining or splitting tensors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape:?} holds {expected} elements but {got} were given")]
    ElementCount {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{datatype} data of shape {shape:?} needs {expected} bytes but {got} were given")]
    ByteCount {
        datatype: DataType,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("BYTES tensor data is malformed: {reason}")]
    MalformedBytes { reason: &'static str },
    #[error("shape {shape:?} is too large")]
    TooLarge { shape: Vec<usize> },
    #[error("cannot join tensors: {reason}")]
    Join { reason: String },
    #[error("cannot split a tensor of shape {shape:?} into batches {sizes:?}")]
    Split {
        shape: Vec<usize>,
        sizes: Vec<usize>,
    },
}

/// A dense tensor of one of the protocol's datatypes.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    Bool(ArrayD<bool>),
    Uint8(ArrayD<u8>),
    Uint16(ArrayD<u16>),
    Uint32(ArrayD<u32>),
    Uint64(ArrayD<u64>),
    Int8(ArrayD<i8>),
    Int16(ArrayD<i16>),
    Int32(ArrayD<i32>),
    Int64(ArrayD<i64>),
    Fp16(ArrayD<f16>),
    Fp32(ArrayD<f32>),
    Fp64(ArrayD<f64>),
    Bytes(ArrayD<Vec<u8>>),
}

/// Runs `$body` with `$a` bound to the inner array, whatever the variant.
#[macro_export]
#[doc(hidden)]
macro_rules! for_each_tensor {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::Tensor::Bool($a) => $body,
            $crate::Tensor::Uint8($a) => $body,
            $crate::Tensor::Uint16($a) => $body,
            $crate::Tensor::Uint32($a) => $body,
            $crate::Tensor::Uint64($a) => $body,
            $crate::Tensor::Int8($a) => $body,
            $crate::Tensor::Int16($a) => $body,
            $crate::Tensor::Int32($a) => $body,
            $crate::Tensor::Int64($a) => $body,
            $crate::Tensor::Fp16($a) => $body,
            $crate::Tensor::Fp32($a) => $body,
            $crate::Tensor::Fp64($a) => $body,
            $crate::Tensor::Bytes($a) => $body,
        }
    };
}

/// Like [`for_each_tensor`], but `$body` yields an array that is wrapped back in the same variant.
macro_rules! map_tensor {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::Bool($a) => Tensor::Bool($body),
            Tensor::Uint8($a) => Tensor::Uint8($body),
            Tensor::Uint16($a) => Tensor::Uint16($body),
            Tensor::Uint32($a) => Tensor::Uint32($body),
            Tensor::Uint64($a) => Tensor::Uint64($body),
            Tensor::Int8($a) => Tensor::Int8($body),
            Tensor::Int16($a) => Tensor::Int16($body),
            Tensor::Int32($a) => Tensor::Int32($body),
            Tensor::Int64($a) => Tensor::Int64($body),
            Tensor::Fp16($a) => Tensor::Fp16($body),
            Tensor::Fp32($a) => Tensor::Fp32($body),
            Tensor::Fp64($a) => Tensor::Fp64($body),
            Tensor::Bytes($a) => Tensor::Bytes($body),
        }
    };
}

/// Element types a [`Tensor`] can hold.
pub trait Element: Clone + Send + Sync + 'static {
    const DATATYPE: DataType;
    fn wrap(array: ArrayD<Self>) -> Tensor;
    fn view(tensor: &Tensor) -> Option<ndarray::ArrayViewD<'_, Self>>;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DATATYPE: DataType = DataType::$variant;
            fn wrap(array: ArrayD<Self>) -> Tensor {
                Tensor::$variant(array)
            }
            fn view(tensor: &Tensor) -> Option<ndarray::ArrayViewD<'_, Self>> {
                match tensor {
                    Tensor::$variant(a) => Some(a.view()),
                    _ => None,
                }
            }
        }
    };
}
element!(bool, Bool);
element!(u8, Uint8);
element!(u16, Uint16);
element!(u32, Uint32);
element!(u64, Uint64);
element!(i8, Int8);
element!(i16, Int16);
element!(i32, Int32);
element!(i64, Int64);
element!(f16, Fp16);
element!(f32, Fp32);
element!(f64, Fp64);
element!(Vec<u8>, Bytes);

/// Largest number of elements one tensor may declare (2^31), whatever its datatype: a guard
/// against shapes whose product overflows or asks for absurd allocations.
pub const MAX_ELEMENTS: usize = 1 << 31;

/// Number of elements in `shape`, or an error when the product overflows [`MAX_ELEMENTS`].
pub fn element_count(shape: &[usize]) -> Result<usize, TensorError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| TensorError::TooLarge {
            shape: shape.to_vec(),
        })
}

impl Tensor {
    /// Builds a tensor from a shape and its elements in row-major order.
    pub fn from_vec<T: Element>(shape: Vec<usize>, data: Vec<T>) -> Result<Tensor, TensorError> {
        let expected = element_count(&shape)?;
        if expected != data.len() {
            return Err(TensorError::ElementCount {
                shape,
                expected,
                got: data.len(),
            });
        }
        let array =
            ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|_| TensorError::ElementCount {
                shape: shape.clone(),
                expected,
                got: expected,
            })?;
        Ok(T::wrap(array))
    }

    /// The protocol datatype.
    pub fn datatype(&self) -> DataType {
        match self {
            Tensor::Bool(_) => DataType::Bool,
            Tensor::Uint8(_) => DataType::Uint8,
            Tensor::Uint16(_) => DataType::Uint16,
            Tensor::Uint32(_) => DataType::Uint32,
            Tensor::Uint64(_) => DataType::Uint64,
            Tensor::Int8(_) => DataType::Int8,
            Tensor::Int16(_) => DataType::Int16,
            Tensor::Int32(_) => DataType::Int32,
            Tensor::Int64(_) => DataType::Int64,
            Tensor::Fp16(_) => DataType::Fp16,
            Tensor::Fp32(_) => DataType::Fp32,
            Tensor::Fp64(_) => DataType::Fp64,
            Tensor::Bytes(_) => DataType::Bytes,
        }
    }

    pub fn shape(&self) -> &[usize] {
        for_each_tensor!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        for_each_tensor!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A view of the elements when the tensor holds `T`.
    pub fn view<T: Element>(&self) -> Option<ndarray::ArrayViewD<'_, T>> {
        T::view(self)
    }

    /// The length of [`Tensor::to_raw`]'s encoding, without encoding.
    pub fn raw_len(&self) -> usize {
        match (self, self.datatype().element_size()) {
            (Tensor::Bytes(a), _) => a.iter().map(|b| b.len() + 4).sum(),
            (_, Some(size)) => self.len() * size,
            (_, None) => 0,
        }
    }

    /// About what the tensor takes in memory: its elements for fixed-size types; for `BYTES`,
    /// each element's own allocation (the vector's header, its bytes rounded up to the
    /// allocator's 16-byte granule, and the allocator's header) — an empty string costs 40
    /// bytes here where it costs 4 in Triton's binary layout and 3 in JSON.
    pub fn memory_len(&self) -> usize {
        match self {
            Tensor::Bytes(a) => a
                .iter()
                .map(|b| std::mem::size_of::<Vec<u8>>() + 16 + b.len().next_multiple_of(16))
                .sum(),
            _ => self.raw_len(),
        }
    }

    /// Appends [`Tensor::to_raw`]'s encoding to `out`, without an intermediate buffer.
    pub fn write_raw(&self, out: &mut Vec<u8>) {
        out.reserve(self.raw_len());
        self.for_each_raw_chunk(|chunk| out.extend_from_slice(chunk));
    }

    /// Decodes Triton's binary tensor layout: fixed-size elements little-endian, row-major;
    /// `BYTES` elements each prefixed by a 4-byte little-endian length.
    pub fn from_raw(
        datatype: DataType,
        shape: Vec<usize>,
        raw: &[u8],
    ) -> Result<Tensor, TensorError> {
        let count = element_count(&shape)?;
        if let Some(size) = datatype.element_size() {
            let expected = count
                .checked_mul(size)
                .ok_or_else(|| TensorError::TooLarge {
                    shape: shape.clone(),
                })?;
            if raw.len() != expected {
                return Err(TensorError::ByteCount {
                    datatype,
                    shape,
                    expected,
                    got: raw.len(),
                });
            }
        }
        macro_rules! le {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                let v: Vec<$t> = raw
                    .chunks_exact(N)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of N bytes")))
                    .collect();
                Tensor::from_vec(shape, v)
            }};
        }
        match datatype {
            DataType::Bool => Tensor::from_vec(shape, raw.iter().map(|&b| b != 0).collect()),
            DataType::Uint8 => Tensor::from_vec(shape, raw.to_vec()),
            DataType::Uint16 => le!(u16),
            DataType::Uint32 => le!(u32),
            DataType::Uint64 => le!(u64),
            DataType::Int8 => Tensor::from_vec(shape, raw.iter().map(|&b| b as i8).collect()),
            DataType::Int16 => le!(i16),
            DataType::Int32 => le!(i32),
            DataType::Int64 => le!(i64),
            DataType::Fp16 => le!(f16),
            DataType::Fp32 => le!(f32),
            DataType::Fp64 => le!(f64),
            DataType::Bytes => {
                let mut items = Vec::with_capacity(count.min(raw.len() / 4));
                let mut rest = raw;
                while !rest.is_empty() {
                    if rest.len() < 4 {
                        return Err(TensorError::MalformedBytes {
                            reason: "truncated 4-byte length prefix",
                        });
                    }
                    let (len, tail) = rest.split_at(4);
                    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                    if tail.len() < len {
                        return Err(TensorError::MalformedBytes {
                            reason: "element length runs past the end of the data",
                        });
                    }
                    let (item, tail) = tail.split_at(len);
                    items.push(item.to_vec());
                    rest = tail;
                }
                Tensor::from_vec(shape, items)
            }
        }
    }

    /// Encodes the tensor in Triton's binary layout (the inverse of [`Tensor::from_raw`]).
    pub fn to_raw(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw_len());
        self.for_each_raw_chunk(|chunk| out.extend_from_slice(chunk));
        out
    }

    /// Feeds the tensor's bytes in Triton's binary layout (what [`Tensor::to_raw`] returns) to
    /// `sink` without building a copy of the tensor: a contiguous numeric tensor goes as one
    /// borrowed slice (on little-endian machines), anything else through a small buffer.
    pub fn for_each_raw_chunk(&self, mut sink: impl FnMut(&[u8])) {
        fn buffered<T, const N: usize>(
            items: impl Iterator<Item = T>,
            bytes: impl Fn(T) -> [u8; N],
            sink: &mut impl FnMut(&[u8]),
        ) {
            let mut buf = [0u8; 4096];
            let mut n = 0;
            for x in items {
                if n + N > buf.len() {
                    sink(&buf[..n]);
                    n = 0;
                }
                buf[n..n + N].copy_from_slice(&bytes(x));
                n += N;
            }
            if n > 0 {
                sink(&buf[..n]);
            }
        }
        macro_rules! pod {
            ($a:expr) => {{
                match $a.as_slice() {
                    Some(s) if cfg!(target_endian = "little") => sink(bytemuck::cast_slice(s)),
                    _ => buffered($a.iter(), |x| x.to_le_bytes(), &mut sink),
                }
            }};
        }
        match self {
            Tensor::Bool(a) => buffered(a.iter(), |&b| [b as u8], &mut sink),
            Tensor::Uint8(a) => pod!(a),
            Tensor::Uint16(a) => pod!(a),
            Tensor::Uint32(a) => pod!(a),
            Tensor::Uint64(a) => pod!(a),
            Tensor::Int8(a) => pod!(a),
            Tensor::Int16(a) => pod!(a),
            Tensor::Int32(a) => pod!(a),
            Tensor::Int64(a) => pod!(a),
            Tensor::Fp16(a) => pod!(a),
            Tensor::Fp32(a) => pod!(a),
            Tensor::Fp64(a) => pod!(a),
            Tensor::Bytes(a) => {
                for item in a.iter() {
                    sink(&(item.len() as u32).to_le_bytes());
                    sink(item);
                }
            }
        }
    }

    /// Joins tensors of one datatype along axis 0 (the batch axis).
    pub fn concat(parts: &[&Tensor]) -> Result<Tensor, TensorError> {
        let first = parts.first().ok_or_else(|| TensorError::Join {
            reason: "no tensors".into(),
        })?;
        if parts.len() == 1 {
            return Ok((*first).clone());
        }
        macro_rules! join {
            ($variant:ident) => {{
                let views = parts
                    .iter()
                    .map(|t| match t {
                        Tensor::$variant(a) => Ok(a.view()),
                        other => Err(TensorError::Join {
                            reason: format!(
                                "datatypes differ ({} and {})",
                                first.datatype(),
                                other.datatype()
                            ),
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let joined =
                    ndarray::concatenate(Axis(0), &views).map_err(|e| TensorError::Join {
                        reason: e.to_string(),
                    })?;
                Tensor::$variant(joined)
            }};
        }
        Ok(match first {
            Tensor::Bool(_) => join!(Bool),
            Tensor::Uint8(_) => join!(Uint8),
            Tensor::Uint16(_) => join!(Uint16),
            Tensor::Uint32(_) => join!(Uint32),
            Tensor::Uint64(_) => join!(Uint64),
            Tensor::Int8(_) => join!(Int8),
            Tensor::Int16(_) => join!(Int16),
            Tensor::Int32(_) => join!(Int32),
            Tensor::Int64(_) => join!(Int64),
            Tensor::Fp16(_) => join!(Fp16),
            Tensor::Fp32(_) => join!(Fp32),
            Tensor::Fp64(_) => join!(Fp64),
            Tensor::Bytes(_) => join!(Bytes),
        })
    }

    /// Splits along axis 0 into consecutive pieces of the given sizes, which must add up to
    /// the tensor's first dimension.
    pub fn split(&self, sizes: &[usize]) -> Result<Vec<Tensor>, TensorError> {
        let rows = self.shape().first().copied();
        if rows != Some(sizes.iter().sum()) {
            return Err(TensorError::Split {
                shape: self.shape().to_vec(),
                sizes: sizes.to_vec(),
            });
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let range = ndarray::Slice::from(start..start + n);
            out.push(map_tensor!(self, a => a.slice_axis(Axis(0), range).to_owned()));
            start += n;
        }
        Ok(out)
    }
}

/// A tensor with the name of the model input or output it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        NamedTensor {
            name: name.into(),
            tensor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(d.as_str().parse::<DataType>().unwrap(), d);
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.as_str())
            );
        }
        assert!("FLOAT".parse::<DataType>().is_err());
    }

    #[test]
    fn raw_round_trip_every_datatype() {
        let shape = vec![2, 2];
        let cases: Vec<Tensor> = vec![
            Tensor::from_vec(shape.clone(), vec![true, false, false, true]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![1u8, 2, 3, 255]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![1u16, 2, 3, u16::MAX]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![1u32, 2, 3, u32::MAX]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![1u64, 2, 3, u64::MAX]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![-1i8, 2, 3, i8::MIN]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![-1i16, 2, 3, i16::MIN]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![-1i32, 2, 3, i32::MIN]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![-1i64, 2, 3, i64::MIN]).unwrap(),
            Tensor::from_vec(
                shape.clone(),
                vec![f16::from_f32(0.5), f16::ONE, f16::ZERO, f16::MAX],
            )
            .unwrap(),
            Tensor::from_vec(shape.clone(), vec![0.5f32, -1.0, f32::MIN_POSITIVE, 3.25]).unwrap(),
            Tensor::from_vec(shape.clone(), vec![0.5f64, -1.0, 1e-300, 3.25]).unwrap(),
            Tensor::from_vec(
                shape.clone(),
                vec![b"a".to_vec(), vec![], b"hello".to_vec(), vec![0, 1]],
            )
            .unwrap(),
        ];
        for t in cases {
            let raw = t.to_raw();
            let back = Tensor::from_raw(t.datatype(), shape.clone(), &raw).unwrap();
            assert_eq!(back, t, "{}", t.datatype());
        }
    }

    #[test]
    fn raw_rejects_wrong_sizes() {
        let err = Tensor::from_raw(DataType::Fp32, vec![2, 3], &[0u8; 20]).unwrap_err();
        assert!(err.to_string().contains("needs 24 bytes but 20"), "{err}");
        assert!(Tensor::from_raw(DataType::Bytes, vec![1], &[5, 0, 0, 0, b'a']).is_err());
        assert!(Tensor::from_raw(DataType::Bytes, vec![1], &[1, 0]).is_err());
        // Two BYTES elements where the shape says one.
        assert!(Tensor::from_raw(DataType::Bytes, vec![1], &[0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(matches!(
            Tensor::from_raw(DataType::Fp32, vec![usize::MAX, 2], &[]),
            Err(TensorError::TooLarge { .. })
        ));
    }

    #[test]
    fn concat_then_split_is_identity() {
        let a = Tensor::from_vec(vec![1, 3], vec![1.0f32, 2.0, 3.0]).unwrap();
        let b = Tensor::from_vec(vec![2, 3], vec![4.0f32, 5.0, 6.0, 7.0, 8.0, 9.0]).unwrap();
        let joined = Tensor::concat(&[&a, &b]).unwrap();
        assert_eq!(joined.shape(), &[3, 3]);
        let parts = joined.split(&[1, 2]).unwrap();
        assert_eq!(parts, vec![a.clone(), b]);
        let other = Tensor::from_vec(vec![1, 3], vec![1i64, 2, 3]).unwrap();
        assert!(Tensor::concat(&[&a, &other]).is_err());
        assert!(joined.split(&[1, 1]).is_err());
    }
}
