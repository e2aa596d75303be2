//! Element types and quantized block geometry.

use crate::{Error, Result};

/// Element type of MLX quantization scales and biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HalfType {
    /// bfloat16 (what mlx-community checkpoints use).
    Bf16,
    /// IEEE half.
    F16,
    /// f32.
    F32,
}

impl HalfType {
    /// Bytes per value.
    pub const fn bytes(self) -> usize {
        match self {
            HalfType::Bf16 | HalfType::F16 => 2,
            HalfType::F32 => 4,
        }
    }
}

/// MLX affine quantization: each group of `group` weights of a row is
/// `scale · q + bias` with `q` an unsigned `bits`-bit integer; a row's `q`
/// values are a little-endian bit stream (value `i` in bits
/// `[i·bits, (i+1)·bits)`, so 3-, 5- and 6-bit values straddle words). The
/// packed values, the scales and the biases are three tensors of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MlxQuant {
    /// Bits per weight: 2, 3, 4, 5, 6 or 8.
    pub bits: u8,
    /// Weights per scale/bias: 32, 64 or 128.
    pub group: u16,
    /// Type of the scales and biases.
    pub scales: HalfType,
}

impl MlxQuant {
    /// A checked MLX quantization.
    pub fn new(bits: u32, group: u32, scales: HalfType) -> Result<MlxQuant> {
        if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) || !matches!(group, 32 | 64 | 128) {
            return Err(Error::Unsupported(format!(
                "MLX quantization with {bits} bits and group size {group} (supported: 2, 3, 4, 5, 6, 8 bits; groups of 32, 64, 128)"
            )));
        }
        Ok(MlxQuant {
            bits: bits as u8,
            group: group as u16,
            scales,
        })
    }

    /// Bytes of the scales (or of the biases) of a row of `n` weights.
    pub fn aux_row_bytes(&self, n: usize) -> usize {
        n / self.group as usize * self.scales.bytes()
    }
}

/// Element type of block-scaled FP8's scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fp8Scale {
    /// f32 (DeepSeek-V3's, Kimi K2's, GLM-4.5's checkpoints).
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// OCP E8M0, a power of two `2^(b - 127)` (transformers' `ue8m0`
    /// scale format; 255 is NaN).
    E8M0,
}

impl Fp8Scale {
    /// Bytes per value.
    pub const fn bytes(self) -> usize {
        match self {
            Fp8Scale::F32 => 4,
            Fp8Scale::Bf16 | Fp8Scale::F16 => 2,
            Fp8Scale::E8M0 => 1,
        }
    }
}

/// Block-scaled FP8, as DeepSeek-V3, Kimi K2, GLM-4.5 and Qwen3 publish
/// their FP8 checkpoints: one OCP E4M3 byte per weight (`float8_e4m3fn`:
/// exponent bias 7, no infinities), times one scale per
/// `block_rows × block_cols` tile of the matrix. The scales (the file's
/// `weight_scale_inv`, `ceil(rows / block_rows) × ceil(cols / block_cols)`
/// values) are a separate tensor; the last tiles of a row or column may be
/// partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fp8Block {
    /// Rows per scale (128 in the published checkpoints).
    pub block_rows: u32,
    /// Columns per scale (128 in the published checkpoints).
    pub block_cols: u32,
    /// Type of the scales.
    pub scales: Fp8Scale,
}

impl Fp8Block {
    /// A checked block geometry (each side 1 to 65536).
    pub fn new(block_rows: u32, block_cols: u32, scales: Fp8Scale) -> Result<Fp8Block> {
        if !(1..=1 << 16).contains(&block_rows) || !(1..=1 << 16).contains(&block_cols) {
            return Err(Error::Unsupported(format!(
                "FP8 scale blocks of {block_rows}x{block_cols} weights (each side must be 1 to 65536)"
            )));
        }
        Ok(Fp8Block {
            block_rows,
            block_cols,
            scales,
        })
    }

    /// Scales per row of the scale grid for rows of `cols` weights.
    pub fn scale_cols(&self, cols: usize) -> usize {
        cols.div_ceil(self.block_cols as usize)
    }

    /// Bytes of one row of the scale grid for rows of `cols` weights.
    pub fn aux_row_bytes(&self, cols: usize) -> usize {
        self.scale_cols(cols) * self.scales.bytes()
    }

    /// Rows of the scale grid that `rows` weight rows cover when the first
    /// sits at position `row0` of its block of rows.
    pub fn scale_rows(&self, row0: usize, rows: usize) -> usize {
        (row0 + rows).div_ceil(self.block_rows as usize)
    }
}

/// A tensor element type: plain floats or a block-quantized format.
///
/// Quantized types pack `block_size()` weights of one row into
/// `block_bytes()` bytes; a row's length must be a multiple of the block size.
/// The numbering follows GGUF's `ggml_type`.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    /// OCP microscaling FP4 (gpt-oss's experts): per 32 weights an E8M0
    /// exponent byte and 16 bytes of E2M1 codes, ggml's layout (byte `j`
    /// holds weight `j` low and weight `j + 16` high).
    MXFP4,
    /// MLX affine quantization; the block is one group's packed values
    /// (its scale and bias live in separate tensors).
    Mlx(MlxQuant),
    /// Block-scaled FP8: one byte per weight, the scales a separate tensor.
    FP8(Fp8Block),
}

impl DType {
    /// Every supported type.
    pub const ALL: [DType; 14] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::MXFP4,
    ];

    /// Elements per block (1 for plain floats).
    pub const fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::MXFP4 => {
                32
            }
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => 256,
            DType::Mlx(q) => q.group as usize,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::FP8(_) => 1,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::MXFP4 => 17,
            DType::Mlx(q) => q.group as usize * q.bits as usize / 8,
        }
    }

    /// True for block-quantized types (FP8, a float per weight with scales
    /// beside, is not one).
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of a row of `n` elements, or an error when `n` is not a whole
    /// number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return Err(Error::Model(format!(
                "row of {n} elements is not a multiple of the {self} block size {}",
                self.block_size()
            )));
        }
        (n / self.block_size())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| Error::Model(format!("row of {n} {self} elements overflows")))
    }

    /// Bytes of a tensor with the given element count (checked).
    pub fn tensor_bytes(self, shape: &[usize]) -> Result<usize> {
        let inner = *shape.last().unwrap_or(&1);
        let outer = shape[..shape.len().saturating_sub(1)]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Model(format!("tensor shape {shape:?} overflows")))?;
        self.row_bytes(inner)?
            .checked_mul(outer)
            .ok_or_else(|| Error::Model(format!("tensor shape {shape:?} overflows")))
    }

    /// True for MLX affine quantization, whose scales and biases are
    /// separate tensors.
    pub const fn is_mlx(self) -> bool {
        matches!(self, DType::Mlx(_))
    }

    /// True for the types whose scales are a separate tensor (MLX, FP8).
    pub const fn has_aux(self) -> bool {
        matches!(self, DType::Mlx(_) | DType::FP8(_))
    }

    /// GGUF's numeric type id (`u32::MAX` for MLX and FP8 types, which GGUF
    /// lacks).
    pub const fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2_K => 10,
            DType::Q3_K => 11,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::BF16 => 30,
            DType::MXFP4 => 39,
            DType::Mlx(_) | DType::FP8(_) => u32::MAX,
        }
    }

    /// The type with GGUF id `id`, if sluice supports it.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// Name as GGUF and llama.cpp write it (`Q4_K`, `F16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::MXFP4 => "MXFP4",
            DType::Mlx(q) => match q.bits {
                2 => "MLX2",
                3 => "MLX3",
                4 => "MLX4",
                5 => "MLX5",
                6 => "MLX6",
                _ => "MLX8",
            },
            DType::FP8(_) => "FP8",
        }
    }

    /// Parses a name case-insensitively (`q8_0`, `bf16`).
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::Mlx(q) => write!(f, "{}g{}", self.name(), q.group),
            DType::FP8(q) => write!(f, "FP8[{}x{}]", q.block_rows, q.block_cols),
            _ => f.write_str(self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip_and_names_parse() {
        for t in DType::ALL {
            assert_eq!(DType::from_ggml_id(t.ggml_id()), Some(t));
            assert_eq!(DType::parse(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(DType::from_ggml_id(9), None);
    }

    #[test]
    fn row_bytes_rejects_partial_blocks_and_overflow() {
        assert_eq!(DType::Q4_K.row_bytes(512).unwrap(), 288);
        assert!(DType::Q4_K.row_bytes(96).is_err());
        assert!(DType::F32.tensor_bytes(&[usize::MAX, 4]).is_err());
        assert_eq!(DType::Q8_0.tensor_bytes(&[3, 64]).unwrap(), 3 * 68);
    }
}
