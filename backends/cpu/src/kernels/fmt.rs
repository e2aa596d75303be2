//! Weight formats as the 8-bit-activation kernels see them.
//!
//! Every quantized type is read in *units* of 32 consecutive weights of a
//! row (a Q4_0 block, an eighth of a K-quant super-block, 32 values of an
//! MLX group). Within a unit each weight is
//!
//! ```text
//! w[i] = W[h] · c[i] + M[h]        h = i / 16 (the unit's two halves)
//! ```
//!
//! with `c` an unsigned 8-bit code and `W`, `M` floats: the block scale and
//! zero point, a K-quant sub-block's scale and min, an MLX group's scale
//! and bias. With activations quantized per unit (`a[i] ≈ da · q[i]`, see
//! `act.rs`), a unit's contribution to a dot product is
//!
//! ```text
//! Σ_h  W[h]·da · Σ_{i∈h} c[i]·q[i]   +   M[h] · (da · Σ_{i∈h} q[i])
//! ```
//!
//! an exact integer dot per half, one float multiply-add per half, and a
//! correction that depends on the activations' sums only. [`header`]
//! computes `W` and `M` for a run of units (shared by every instruction
//! set); [`codes`] is the reference unpacking of a unit's codes, which each
//! SIMD module reproduces in registers. Where an instruction set multiplies
//! signed bytes only (AVX2's `maddubs`, NEON's `sdot`), 8-bit codes are
//! read as `c - 128` and `M` absorbs `128·W` ([`Signed8`]).

use sluice_core::{DType, HalfType, MlxQuant};

/// Weights per unit.
pub const UNIT: usize = 32;
/// Units whose `W` and `M` are computed together (512 weights: two K-quant
/// super-blocks, any MLX group).
pub const CHUNK: usize = 16;

/// How 8-bit codes are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signed8 {
    /// As unsigned bytes (VNNI's `vpdpbusd`, the scalar reference).
    No,
    /// As `c - 128` (AVX2, NEON): `M` gains `128·W` for 8-bit types.
    Yes,
}

/// IEEE half to f32, exact for every input (normals, subnormals,
/// infinities, NaNs), without branches on the common path.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let em = (h as u32 & 0x7fff) << 13;
    let sign = (h as u32 & 0x8000) << 16;
    // Rebias the exponent by multiplying with 2^112; this also normalizes
    // subnormals exactly.
    let mut v = f32::from_bits(em) * f32::from_bits(0x7780_0000);
    if h & 0x7c00 == 0x7c00 {
        v = f32::from_bits(em | 0x7f80_0000);
    }
    f32::from_bits(v.to_bits() | sign)
}

#[inline(always)]
fn half_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// A value of an MLX scale or bias tensor.
#[inline(always)]
fn aux_value(t: HalfType, b: &[u8], i: usize) -> f32 {
    match t {
        HalfType::Bf16 => {
            f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
        }
        HalfType::F16 => half_at(b, 2 * i),
        HalfType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
    }
}

/// One row of a quantized matrix: its bytes and, for MLX types, its
/// scales and biases.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    /// `dtype.row_bytes(cols)` bytes.
    pub data: &'a [u8],
    /// MLX: one scale per group (else empty).
    pub scales: &'a [u8],
    /// MLX: one bias per group (else empty).
    pub biases: &'a [u8],
}

/// Bytes of a quantized unit for the types whose units are whole blocks.
pub const fn block_unit_bytes(dt: DType) -> usize {
    match dt {
        DType::Q4_0 => 18,
        DType::Q4_1 => 20,
        DType::Q5_0 => 22,
        DType::Q5_1 => 24,
        DType::Q8_0 => 34,
        DType::MXFP4 => 17,
        _ => 0,
    }
}

/// MXFP4's codes: the doubled E2M1 value of each nibble plus 12 (0..24),
/// so that a weight is `W·c + M` with `W` the block's scale and `M = -12·W`.
pub const MXFP4_CODES: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (sluice_core::quant::MXFP4_VALUES[i] + 12) as u8;
        i += 1;
    }
    t
};

/// The 16 6-bit scales of a Q3_K super-block, as ggml unpacks them.
#[inline(always)]
pub fn q3k_scales(sc: &[u8]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = u32::from_le_bytes([sc[0], sc[1], sc[2], sc[3]]);
    let a1 = u32::from_le_bytes([sc[4], sc[5], sc[6], sc[7]]);
    let tmp = u32::from_le_bytes([sc[8], sc[9], sc[10], sc[11]]);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, s) in out.iter_mut().enumerate() {
        *s = (aux[i / 4] >> (8 * (i % 4))) as u8 as i8;
    }
    out
}

/// The (scale, min) pair `j` of a Q4_K/Q5_K 12-byte packed scale array.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `W` and `M` of units `u0..u0 + n` of `row` (`w[2i + h]`, `m[2i + h]`
/// for unit `u0 + i`, half `h`). For K-quants `u0` and `n` are multiples
/// of 8; for MLX types, of the group's units.
#[inline(always)]
pub fn header(
    dt: DType,
    row: Row<'_>,
    u0: usize,
    n: usize,
    s8: Signed8,
    w: &mut [f32],
    m: &mut [f32],
) {
    let b = row.data;
    match dt {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => {
            let (bb, zero) = match dt {
                DType::Q4_0 => (18, -8.0),
                DType::Q5_0 => (22, -16.0),
                _ => (34, if s8 == Signed8::Yes { 0.0 } else { -128.0 }),
            };
            for i in 0..n {
                let d = half_at(b, (u0 + i) * bb);
                w[2 * i] = d;
                w[2 * i + 1] = d;
                m[2 * i] = zero * d;
                m[2 * i + 1] = zero * d;
            }
        }
        DType::MXFP4 => {
            for i in 0..n {
                let d = sluice_core::quant::e8m0_half(b[(u0 + i) * 17]);
                w[2 * i] = d;
                w[2 * i + 1] = d;
                m[2 * i] = -12.0 * d;
                m[2 * i + 1] = -12.0 * d;
            }
        }
        DType::Q4_1 | DType::Q5_1 => {
            let bb = if dt == DType::Q4_1 { 20 } else { 24 };
            for i in 0..n {
                let o = (u0 + i) * bb;
                let (d, mn) = (half_at(b, o), half_at(b, o + 2));
                w[2 * i] = d;
                w[2 * i + 1] = d;
                m[2 * i] = mn;
                m[2 * i + 1] = mn;
            }
        }
        DType::Q2_K => {
            for s in 0..n / 8 {
                let blk = &b[(u0 / 8 + s) * 84..][..84];
                let (d, dmin) = (half_at(blk, 80), half_at(blk, 82));
                for j in 0..16 {
                    let sc = blk[j];
                    w[16 * s + j] = d * (sc & 15) as f32;
                    m[16 * s + j] = -dmin * (sc >> 4) as f32;
                }
            }
        }
        DType::Q3_K => {
            for s in 0..n / 8 {
                let blk = &b[(u0 / 8 + s) * 110..][..110];
                let d = half_at(blk, 108);
                let sc = q3k_scales(&blk[96..108]);
                for j in 0..16 {
                    let ws = d * (sc[j] as i32 - 32) as f32;
                    w[16 * s + j] = ws;
                    m[16 * s + j] = -4.0 * ws;
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let bb = if dt == DType::Q4_K { 144 } else { 176 };
            for s in 0..n / 8 {
                let blk = &b[(u0 / 8 + s) * bb..][..bb];
                let (d, dmin) = (half_at(blk, 0), half_at(blk, 2));
                for j in 0..8 {
                    let (sc, mn) = scale_min_k4(j, &blk[4..16]);
                    let (ws, ms) = (d * sc as f32, -dmin * mn as f32);
                    w[16 * s + 2 * j] = ws;
                    w[16 * s + 2 * j + 1] = ws;
                    m[16 * s + 2 * j] = ms;
                    m[16 * s + 2 * j + 1] = ms;
                }
            }
        }
        DType::Q6_K => {
            for s in 0..n / 8 {
                let blk = &b[(u0 / 8 + s) * 210..][..210];
                let d = half_at(blk, 208);
                for j in 0..16 {
                    let ws = d * (blk[192 + j] as i8) as f32;
                    w[16 * s + j] = ws;
                    m[16 * s + j] = -32.0 * ws;
                }
            }
        }
        DType::Mlx(q) => {
            let per = q.group as usize / UNIT;
            let off = if q.bits == 8 && s8 == Signed8::Yes {
                128.0
            } else {
                0.0
            };
            for i in 0..n {
                let g = (u0 + i) / per;
                let (sc, bi) = (
                    aux_value(q.scales, row.scales, g),
                    aux_value(q.scales, row.biases, g),
                );
                w[2 * i] = sc;
                w[2 * i + 1] = sc;
                m[2 * i] = bi + off * sc;
                m[2 * i + 1] = bi + off * sc;
            }
        }
        DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => {
            unreachable!("float and FP8 weights take the f32 path")
        }
    }
}

/// Reference unpacking: the 32 codes of unit `u` of `row`, in the order of
/// the weights. 8-bit codes are unsigned (Q8_0's stored `q` is `c - 128`).
pub fn codes(dt: DType, row: Row<'_>, u: usize, c: &mut [u8; 32]) {
    let b = row.data;
    match dt {
        DType::Q4_0 | DType::Q4_1 => {
            let (bb, at) = if dt == DType::Q4_0 { (18, 2) } else { (20, 4) };
            let qs = &b[u * bb + at..][..16];
            for j in 0..16 {
                c[j] = qs[j] & 15;
                c[j + 16] = qs[j] >> 4;
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let (bb, at) = if dt == DType::Q5_0 { (22, 2) } else { (24, 4) };
            let blk = &b[u * bb..][..bb];
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            for j in 0..16 {
                c[j] = (qs[j] & 15) | ((((qh >> j) & 1) as u8) << 4);
                c[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        DType::Q8_0 => {
            for (o, &q) in c.iter_mut().zip(&b[u * 34 + 2..u * 34 + 34]) {
                *o = q ^ 0x80;
            }
        }
        DType::Q2_K => {
            let blk = &b[(u / 8) * 84..][..84];
            let (n, shift) = ((u % 8) / 4, 2 * (u % 4));
            let q = &blk[16 + 32 * n..][..32];
            for l in 0..32 {
                c[l] = (q[l] >> shift) & 3;
            }
        }
        DType::Q3_K => {
            let blk = &b[(u / 8) * 110..][..110];
            let (n, j) = ((u % 8) / 4, u % 4);
            let q = &blk[32 + 32 * n..][..32];
            let bit = 4 * n + j;
            for l in 0..32 {
                c[l] = ((q[l] >> (2 * j)) & 3) | (((blk[l] >> bit) & 1) << 2);
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let k4 = dt == DType::Q4_K;
            let bb = if k4 { 144 } else { 176 };
            let blk = &b[(u / 8) * bb..][..bb];
            let su = u % 8;
            let q = &blk[if k4 { 16 } else { 48 } + 32 * (su / 2)..][..32];
            let shift = 4 * (su % 2);
            for l in 0..32 {
                let hi = if k4 {
                    0
                } else {
                    ((blk[16 + l] >> su) & 1) << 4
                };
                c[l] = ((q[l] >> shift) & 15) | hi;
            }
        }
        DType::Q6_K => {
            let blk = &b[(u / 8) * 210..][..210];
            let (n, k) = ((u % 8) / 4, u % 4);
            let ql = &blk[64 * n + 32 * (k % 2)..][..32];
            let qh = &blk[128 + 32 * n..][..32];
            for l in 0..32 {
                c[l] = ((ql[l] >> (4 * (k / 2))) & 15) | (((qh[l] >> (2 * k)) & 3) << 4);
            }
        }
        DType::Mlx(q) => mlx_codes(q, b, u, c),
        DType::MXFP4 => {
            let qs = &b[u * 17 + 1..][..16];
            for j in 0..16 {
                c[j] = MXFP4_CODES[(qs[j] & 15) as usize];
                c[j + 16] = MXFP4_CODES[(qs[j] >> 4) as usize];
            }
        }
        DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => {
            unreachable!("float and FP8 weights take the f32 path")
        }
    }
}

/// Unit `u`'s codes of an MLX row: 32 values of `bits` bits, a
/// little-endian bit stream.
fn mlx_codes(q: MlxQuant, b: &[u8], u: usize, c: &mut [u8; 32]) {
    let bits = q.bits as usize;
    let src = &b[u * 4 * bits..][..4 * bits];
    let mask = (1u64 << bits) - 1;
    // Eight values fill `bits` bytes.
    for (k, out) in c.chunks_exact_mut(8).enumerate() {
        let mut word = 0u64;
        for (i, &byte) in src[k * bits..(k + 1) * bits].iter().enumerate() {
            word |= (byte as u64) << (8 * i);
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = ((word >> (j * bits)) & mask) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::quant;

    /// The unit form (`W·c + M`) equals the reference dequantization of
    /// every type, value for value.
    #[test]
    fn units_reproduce_the_reference_dequantization() {
        let mut types: Vec<DType> = DType::ALL
            .iter()
            .copied()
            .filter(|t| super::super::integer(*t))
            .collect();
        for bits in [2, 3, 4, 5, 6, 8] {
            for (g, s) in [
                (32, HalfType::F16),
                (64, HalfType::Bf16),
                (128, HalfType::F32),
            ] {
                types.push(DType::Mlx(MlxQuant::new(bits, g, s).unwrap()));
            }
        }
        for dt in types {
            for s8 in [Signed8::No, Signed8::Yes] {
                let cols = 512;
                let (data, sc, bi) = random_row(dt, cols, 7);
                let row = Row {
                    data: &data,
                    scales: &sc,
                    biases: &bi,
                };
                let mut want = vec![0f32; cols];
                match dt {
                    DType::Mlx(q) => quant::dequantize_mlx(q, &data, &sc, &bi, &mut want).unwrap(),
                    _ => quant::dequantize(dt, &data, &mut want).unwrap(),
                }
                let (mut w, mut m) = ([0f32; 32], [0f32; 32]);
                header(dt, row, 0, 16, s8, &mut w, &mut m);
                for u in 0..16 {
                    let mut c = [0u8; 32];
                    codes(dt, row, u, &mut c);
                    for i in 0..32 {
                        let h = 2 * u + i / 16;
                        let code = match (s8, dt) {
                            (Signed8::Yes, DType::Q8_0) => c[i] as f32 - 128.0,
                            (Signed8::Yes, DType::Mlx(q)) if q.bits == 8 => c[i] as f32 - 128.0,
                            _ => c[i] as f32,
                        };
                        let got = w[h] * code + m[h];
                        let r = want[32 * u + i];
                        assert!(
                            (got - r).abs() <= 1e-6 * (1.0 + r.abs()),
                            "{dt} {s8:?} unit {u} value {i}: {got} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn half_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let a = f16_to_f32(h);
            let b = half::f16::from_bits(h).to_f32();
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{h:#x}"
            );
        }
    }

    /// A random row of `dt` and its MLX scales and biases.
    pub(crate) fn random_row(dt: DType, cols: usize, seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        match dt {
            DType::Mlx(q) => {
                let f = quant::random_tensor_bytes(DType::F32, cols, seed, 1.0);
                let f: Vec<f32> = f
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
                quant::quantize_mlx(q, &f, &mut p, &mut s, &mut b).unwrap();
                (p, s, b)
            }
            _ => (
                quant::random_tensor_bytes(dt, cols, seed, 1.0),
                Vec::new(),
                Vec::new(),
            ),
        }
    }
}
