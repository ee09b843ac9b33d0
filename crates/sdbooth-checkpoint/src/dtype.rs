//! Element types as files store them, and reading a tensor's bytes straight into the vector a
//! candle tensor takes ownership of (no intermediate byte buffer: peak memory is the weights).

use std::io::Read;

use candle_core::{DType, Device, Tensor};

/// A tensor element type, with safetensors' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    U16,
    U32,
    U64,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            F64 | I64 | U64 => 8,
            F32 | I32 | U32 => 4,
            F16 | BF16 | I16 | U16 => 2,
            I8 | U8 | Bool | F8E4M3 | F8E5M2 => 1,
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        use Dtype::*;
        match self {
            F64 => "F64",
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            I64 => "I64",
            I32 => "I32",
            I16 => "I16",
            I8 => "I8",
            U8 => "U8",
            Bool => "BOOL",
            U16 => "U16",
            U32 => "U32",
            U64 => "U64",
            F8E4M3 => "F8_E4M3",
            F8E5M2 => "F8_E5M2",
        }
    }

    pub fn from_safetensors_name(s: &str) -> Option<Self> {
        use Dtype::*;
        Some(match s {
            "F64" => F64,
            "F32" => F32,
            "F16" => F16,
            "BF16" => BF16,
            "I64" => I64,
            "I32" => I32,
            "I16" => I16,
            "I8" => I8,
            "U8" => U8,
            "BOOL" => Bool,
            "U16" => U16,
            "U32" => U32,
            "U64" => U64,
            "F8_E4M3" => F8E4M3,
            "F8_E5M2" => F8E5M2,
            _ => return None,
        })
    }

    pub fn to_candle(self) -> Option<DType> {
        Some(match self {
            Dtype::F64 => DType::F64,
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::I16 => DType::I16,
            Dtype::U8 => DType::U8,
            Dtype::U32 => DType::U32,
            _ => return None,
        })
    }

    pub fn from_candle(d: DType) -> Option<Self> {
        Some(match d {
            DType::F64 => Dtype::F64,
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            DType::I16 => Dtype::I16,
            DType::U8 => Dtype::U8,
            DType::U32 => Dtype::U32,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Element count of a shape; None on overflow (a hostile header can claim any shape).
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn read_as<T, R>(r: &mut R, shape: &[usize], n: usize) -> Result<Tensor, String>
where
    T: bytemuck::Pod + candle_core::WithDType,
    R: Read,
{
    let mut v: Vec<T> = vec![T::zeroed(); n];
    r.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(|e| format!("reading data: {e}"))?;
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// Reads `numel(shape)` little-endian elements of `dtype` from `r` into a new CPU tensor.
/// The error string is wrapped by the caller with the file and key.
pub fn read_tensor_data<R: Read>(r: &mut R, dtype: Dtype, shape: &[usize]) -> Result<Tensor, String> {
    // Files are little-endian; so is every platform sdbooth targets (x86-64, aarch64).
    let n = checked_numel(shape).ok_or("shape overflows")?;
    match dtype {
        Dtype::F32 => read_as::<f32, R>(r, shape, n),
        Dtype::F16 => read_as::<half::f16, R>(r, shape, n),
        Dtype::BF16 => read_as::<half::bf16, R>(r, shape, n),
        Dtype::F64 => read_as::<f64, R>(r, shape, n),
        Dtype::I64 => read_as::<i64, R>(r, shape, n),
        Dtype::I32 => read_as::<i32, R>(r, shape, n),
        Dtype::U32 => read_as::<u32, R>(r, shape, n),
        Dtype::U8 | Dtype::Bool => read_as::<u8, R>(r, shape, n),
        other => Err(format!("element type {other} cannot be loaded as a tensor")),
    }
}

/// Writes a tensor's elements as `dtype` (converting if needed), one tensor at a time so saving
/// never holds a second copy of the whole model.
pub fn write_tensor_data<W: std::io::Write>(w: &mut W, t: &Tensor, dtype: Dtype) -> Result<(), String> {
    let cd = dtype.to_candle().ok_or_else(|| format!("cannot write element type {dtype}"))?;
    let t = t.to_device(&Device::Cpu).and_then(|t| t.to_dtype(cd)).and_then(|t| t.flatten_all());
    let t = t.map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| e.to_string();
    let c = |e: candle_core::Error| e.to_string();
    match cd {
        DType::F32 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<f32>().map_err(c)?)).map_err(io),
        DType::F16 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<half::f16>().map_err(c)?)).map_err(io),
        DType::BF16 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<half::bf16>().map_err(c)?)).map_err(io),
        DType::F64 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<f64>().map_err(c)?)).map_err(io),
        DType::I64 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<i64>().map_err(c)?)).map_err(io),
        DType::I32 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<i32>().map_err(c)?)).map_err(io),
        DType::U32 => w.write_all(bytemuck::cast_slice(&t.to_vec1::<u32>().map_err(c)?)).map_err(io),
        DType::U8 => w.write_all(&t.to_vec1::<u8>().map_err(c)?).map_err(io),
        other => Err(format!("cannot write element type {other:?}")),
    }
}
