//! Dequantization of every supported block type.
//!
//! These follow ggml's reference C code operation for operation, so that the
//! results equal `gguf.quants.dequantize` bit for bit; the CPU backend's
//! kernels are built on them and the oracle tests hold them to that.

use crate::{DType, Error, HalfType, MlxQuant, Result};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `dst.len()` elements of type `dtype` stored in `src`.
///
/// `dst.len()` must be a multiple of the block size and `src` exactly the
/// bytes of that many elements.
pub fn dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let need = dtype.row_bytes(dst.len())?;
    if src.len() != need {
        return Err(Error::Invalid(format!(
            "dequantize {dtype}: {} elements need {need} bytes, got {}",
            dst.len(),
            src.len()
        )));
    }
    dequantize_unchecked(dtype, src, dst);
    Ok(())
}

/// [`dequantize`] without the length checks; panics (never UB) on a mismatch.
pub fn dequantize_unchecked(dtype: DType, src: &[u8], dst: &mut [f32]) {
    let bs = dtype.block_size();
    let bb = dtype.block_bytes();
    match dtype {
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::F16 => halves(src, dst, f16_bits),
        DType::BF16 => halves(src, dst, bf16_bits),
        // The codes' own values: the tile scales are a separate tensor
        // (crate::fp8 applies them).
        DType::FP8(_) => crate::fp8::decode(src, 1.0, dst),
        #[cfg(target_arch = "x86_64")]
        DType::Q4_0 | DType::Q8_0 | DType::MXFP4 if simd::available() => {
            let n = dst.len() / bs;
            assert!(
                src.len() >= n * bb,
                "dequantize: source shorter than its blocks"
            );
            // SAFETY: AVX2 is present (checked at run time), and the block counts of `src` and `dst` were checked just above.
            unsafe {
                match dtype {
                    DType::Q4_0 => simd::q4_0(&src[..n * bb], &mut dst[..n * bs]),
                    DType::Q8_0 => simd::q8_0(&src[..n * bb], &mut dst[..n * bs]),
                    _ => simd::mxfp4(&src[..n * bb], &mut dst[..n * bs]),
                }
            }
        }
        _ => {
            let f = block_fn(dtype);
            for (y, b) in dst.chunks_exact_mut(bs).zip(src.chunks_exact(bb)) {
                f(b, y);
            }
        }
    }
}

/// AVX2 dequantization of the most common expert formats (MXFP4 has no
/// integer kernel, so this is its product's inner loop). Each value
/// is one exact integer-to-float conversion times the block scale, as in
/// the scalar code, so the results are bit-identical; the scalar loops
/// were the larger half of the quantized matmul's time.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// # Safety
    /// AVX2 must be available; `src` holds exactly `dst.len() / 32` blocks.
    #[target_feature(enable = "avx2")]
    pub unsafe fn q4_0(src: &[u8], dst: &mut [f32]) {
        let eight = _mm256_set1_epi32(8);
        for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
            let d = _mm256_set1_ps(super::f16_at(b, 0));
            // SAFETY: `b` has 18 bytes: the scale and 16 bytes of nibbles.
            let qs = unsafe { _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i) };
            let lo = _mm_and_si128(qs, _mm_set1_epi8(0x0f));
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
            for (k, v) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
                .into_iter()
                .enumerate()
            {
                let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(v), eight);
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                // SAFETY: `y` has 32 floats; k*8..k*8+8 is in range.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(k * 8), f) };
            }
        }
    }

    /// # Safety
    /// AVX2 must be available; `src` holds exactly `dst.len() / 32` blocks.
    #[target_feature(enable = "avx2")]
    pub unsafe fn mxfp4(src: &[u8], dst: &mut [f32]) {
        let mut t = [0u8; 16];
        for (o, v) in t.iter_mut().zip(super::MXFP4_VALUES) {
            *o = v as u8;
        }
        // SAFETY: `t` has 16 bytes.
        let lut = unsafe { _mm_loadu_si128(t.as_ptr() as *const __m128i) };
        for (b, y) in src.chunks_exact(17).zip(dst.chunks_exact_mut(32)) {
            let d = _mm256_set1_ps(super::e8m0_half(b[0]));
            // SAFETY: `b` has 17 bytes: the exponent and 16 bytes of codes.
            let qs = unsafe { _mm_loadu_si128(b.as_ptr().add(1) as *const __m128i) };
            let lo = _mm_shuffle_epi8(lut, _mm_and_si128(qs, _mm_set1_epi8(0x0f)));
            let hi = _mm_shuffle_epi8(
                lut,
                _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f)),
            );
            for (k, v) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
                .into_iter()
                .enumerate()
            {
                // Small integers times a power of two: exact, as the scalar.
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
                // SAFETY: `y` has 32 floats; k*8..k*8+8 is in range.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(k * 8), f) };
            }
        }
    }

    /// # Safety
    /// AVX2 must be available; `src` holds exactly `dst.len() / 32` blocks.
    #[target_feature(enable = "avx2")]
    pub unsafe fn q8_0(src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
            let d = _mm256_set1_ps(super::f16_at(b, 0));
            for k in 0..4 {
                // SAFETY: bytes 2 + 8k .. 2 + 8k + 8 lie in the 34-byte block.
                let v = unsafe { _mm_loadl_epi64(b.as_ptr().add(2 + k * 8) as *const __m128i) };
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
                // SAFETY: `y` has 32 floats; k*8..k*8+8 is in range.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(k * 8), f) };
            }
        }
    }
}

/// 16-bit floats through `half`'s slice conversion, which uses the CPU's
/// conversion instructions (F16C) when present: 30x faster than one by one.
fn halves(src: &[u8], dst: &mut [f32], conv: fn(&[u16], &mut [f32])) {
    let mut bits = [0u16; 256];
    for (d, s) in dst.chunks_mut(256).zip(src.chunks(512)) {
        let b = &mut bits[..d.len()];
        for (o, c) in b.iter_mut().zip(s.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]);
        }
        conv(b, d);
    }
}

fn f16_bits(b: &[u16], d: &mut [f32]) {
    b.reinterpret_cast::<f16>().convert_to_f32_slice(d)
}

fn bf16_bits(b: &[u16], d: &mut [f32]) {
    b.reinterpret_cast::<bf16>().convert_to_f32_slice(d)
}

type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(dtype: DType) -> BlockFn {
    match dtype {
        DType::Q4_0 => q4_0,
        DType::Q4_1 => q4_1,
        DType::Q5_0 => q5_0,
        DType::Q5_1 => q5_1,
        DType::Q8_0 => q8_0,
        DType::Q2_K => q2_k,
        DType::Q3_K => q3_k,
        DType::Q4_K => q4_k,
        DType::Q5_K => q5_k,
        DType::Q6_K => q6_k,
        DType::MXFP4 => mxfp4,
        DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => unreachable!("not a block type"),
        DType::Mlx(_) => unreachable!("MLX rows dequantize with dequantize_mlx"),
    }
}

fn half_values(t: HalfType, src: &[u8], dst: &mut [f32]) {
    match t {
        HalfType::Bf16 => halves(src, dst, bf16_bits),
        HalfType::F16 => halves(src, dst, f16_bits),
        HalfType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
    }
}

/// Dequantizes one row of MLX affine-quantized weights: `packed` holds the
/// row's bit stream, `scales` and `biases` one value per group.
pub fn dequantize_mlx(
    q: MlxQuant,
    packed: &[u8],
    scales: &[u8],
    biases: &[u8],
    dst: &mut [f32],
) -> Result<()> {
    let n = dst.len();
    let g = q.group as usize;
    if !n.is_multiple_of(g)
        || packed.len() != n * q.bits as usize / 8
        || scales.len() != q.aux_row_bytes(n)
        || biases.len() != q.aux_row_bytes(n)
    {
        return Err(Error::Invalid(format!(
            "dequantize {}: {n} values need {} packed bytes and {} bytes of scales and of biases, got {}, {}, {}",
            DType::Mlx(q),
            n * q.bits as usize / 8,
            q.aux_row_bytes(n),
            packed.len(),
            scales.len(),
            biases.len()
        )));
    }
    dequantize_mlx_unchecked(q, packed, scales, biases, dst);
    Ok(())
}

/// [`dequantize_mlx`] without the length checks; panics (never UB) on a
/// mismatch.
pub fn dequantize_mlx_unchecked(
    q: MlxQuant,
    packed: &[u8],
    scales: &[u8],
    biases: &[u8],
    dst: &mut [f32],
) {
    let g = q.group as usize;
    let groups = dst.len() / g;
    let mut sb = [0f32; 2 * 256];
    let (sc, bi) = sb.split_at_mut(256);
    let gb = g * q.bits as usize / 8;
    // Groups in batches of up to 256 so the scale conversion is vectorized.
    for start in (0..groups).step_by(256) {
        let m = (groups - start).min(256);
        let hb = q.scales.bytes();
        half_values(
            q.scales,
            &scales[start * hb..(start + m) * hb],
            &mut sc[..m],
        );
        half_values(
            q.scales,
            &biases[start * hb..(start + m) * hb],
            &mut bi[..m],
        );
        for j in 0..m {
            let gi = start + j;
            let src = &packed[gi * gb..(gi + 1) * gb];
            let out = &mut dst[gi * g..(gi + 1) * g];
            let (s, b) = (sc[j], bi[j]);
            match q.bits {
                // Byte-aligned widths: a fixed number of values per byte.
                8 => {
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o = s * v as f32 + b;
                    }
                }
                4 => {
                    for (o, &v) in out.chunks_exact_mut(2).zip(src) {
                        o[0] = s * (v & 15) as f32 + b;
                        o[1] = s * (v >> 4) as f32 + b;
                    }
                }
                2 => {
                    for (o, &v) in out.chunks_exact_mut(4).zip(src) {
                        o[0] = s * (v & 3) as f32 + b;
                        o[1] = s * ((v >> 2) & 3) as f32 + b;
                        o[2] = s * ((v >> 4) & 3) as f32 + b;
                        o[3] = s * (v >> 6) as f32 + b;
                    }
                }
                3 => straddling::<3, 8>(src, out, s, b),
                5 => straddling::<5, 8>(src, out, s, b),
                _ => straddling::<6, 4>(src, out, s, b),
            }
        }
    }
}

/// Values of `BITS` bits that straddle bytes: `PER` of them fill whole
/// bytes (8 for 3 and 5 bits, 4 for 6), read as one little-endian word.
/// Constant widths let the compiler unroll the shifts.
fn straddling<const BITS: usize, const PER: usize>(src: &[u8], out: &mut [f32], s: f32, b: f32) {
    let mask = (1u64 << BITS) - 1;
    for (o, c) in out
        .chunks_exact_mut(PER)
        .zip(src.chunks_exact(PER * BITS / 8))
    {
        let mut w = 0u64;
        for (i, &byte) in c.iter().enumerate() {
            w |= (byte as u64) << (8 * i);
        }
        for (k, v) in o.iter_mut().enumerate() {
            *v = s * ((w >> (k * BITS)) & mask) as f32 + b;
        }
    }
}

/// Quantizes one row to MLX affine format with MLX's formula (per group:
/// the scale spans min..max, its sign and the bias chosen so that the
/// extreme of larger magnitude is exact), appending the packed bytes,
/// scales and biases.
pub fn quantize_mlx(
    q: MlxQuant,
    src: &[f32],
    packed: &mut Vec<u8>,
    scales: &mut Vec<u8>,
    biases: &mut Vec<u8>,
) -> Result<()> {
    let g = q.group as usize;
    if !src.len().is_multiple_of(g) {
        return Err(Error::Invalid(format!(
            "{} values are not a whole number of MLX groups of {g}",
            src.len()
        )));
    }
    let levels = ((1u32 << q.bits) - 1) as f32;
    let put = |out: &mut Vec<u8>, v: f32| match q.scales {
        HalfType::Bf16 => out.extend(bf16::from_f32(v).to_le_bytes()),
        HalfType::F16 => out.extend(f16::from_f32(v).to_le_bytes()),
        HalfType::F32 => out.extend(v.to_le_bytes()),
    };
    let round = |v: f32| match q.scales {
        HalfType::Bf16 => bf16::from_f32(v).to_f32(),
        HalfType::F16 => f16::from_f32(v).to_f32(),
        HalfType::F32 => v,
    };
    let mut acc = 0u64;
    let mut nbits = 0usize;
    for grp in src.chunks_exact(g) {
        let (mn, mx) = grp
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let neg = mn.abs() > mx.abs();
        let mut scale = ((mx - mn) / levels).max(1e-7);
        if !neg {
            scale = -scale;
        }
        let edge = if neg { mn } else { mx };
        let q0 = (edge / scale).round_ties_even();
        let (scale, bias) = if q0 != 0.0 {
            (edge / q0, edge)
        } else {
            (scale, 0.0)
        };
        let (scale, bias) = (round(scale), round(bias));
        put(scales, scale);
        put(biases, bias);
        for &v in grp {
            let code = ((v - bias) / scale).round_ties_even().clamp(0.0, levels) as u64;
            acc |= code << nbits;
            nbits += q.bits as usize;
            while nbits >= 8 {
                packed.push(acc as u8);
                acc >>= 8;
                nbits -= 8;
            }
        }
    }
    Ok(())
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as i32;
        let xh1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = (((qs[j] & 0x0f) as i32 | xh0) - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as i32 | xh1) - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((qs[j] & 0x0f) as u32 | xh0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | xh1) as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0f) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d_all = f16_at(b, 108);
    // Unpack the 16 6-bit scales exactly as ggml does.
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
    let mut scales = [0i8; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        *s = (aux[i / 4] >> (8 * (i % 4))) as u8 as i8;
    }
    let mut is = 0;
    let mut out = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let i = l + 16 * half;
                    let hi = if hm[i] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (((q[i] >> shift) & 3) as i32 - hi) as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// The (scale, min) pair `j` of a Q4_K/Q5_K 12-byte packed scale array.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        let o = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            o[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let q = &ql[32 * j..32 * j + 32];
        let o = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            o[l] = d1 * ((q[l] & 0x0f) + h1) as f32 - m1;
            o[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &ql[64 * n..64 * n + 64];
        let qh = &qh[32 * n..32 * n + 32];
        let sc = &sc[8 * n..8 * n + 8];
        let o = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8 as f32) * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
        }
    }
}

/// MXFP4's E2M1 values, doubled (ggml's table): the exponent byte then
/// scales by `2^(e - 128)`.
pub const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e - 128)`: half of an E8M0 scale, as ggml applies it to the doubled
/// values (subnormal for `e < 2`).
#[inline]
pub fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(((e as u32) - 1) << 23)
    }
}

fn mxfp4(b: &[u8], o: &mut [f32]) {
    let d = e8m0_half(b[0]);
    for j in 0..16 {
        let q = b[1 + j];
        o[j] = MXFP4_VALUES[(q & 15) as usize] as f32 * d;
        o[j + 16] = MXFP4_VALUES[(q >> 4) as usize] as f32 * d;
    }
}

/// Byte offsets of the f16 scale fields inside one block of `dtype`
/// (empty for plain float types and MXFP4, whose scale is a byte).
pub fn scale_field_offsets(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        DType::F32 | DType::F16 | DType::BF16 | DType::MXFP4 | DType::Mlx(_) | DType::FP8(_) => &[],
    }
}

/// Deterministic pseudo-random tensor bytes of `elems` elements of `dtype`
/// whose values are finite and of order `scale` once dequantized: random
/// quant codes with sane block scales. Used by the benchmarks and tests.
pub fn random_tensor_bytes(dtype: DType, elems: usize, seed: u64, scale: f32) -> Vec<u8> {
    let mut out = vec![0u8; dtype.row_bytes(elems).unwrap_or(0)];
    fill_random_tensor(dtype, &mut out, seed, scale);
    out
}

/// Types [`quantize`] can produce.
pub const QUANTIZE_TARGETS: &[DType] = &[
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q4_0,
];

/// Quantizes `src` (a whole number of blocks) to `dtype`, appending to
/// `out`, with the reference formulas of ggml / gguf-py (Q8_0: scale
/// max|x|/127, round to nearest; Q4_0: scale = the signed value of largest
/// magnitude / -8, codes `trunc(x/d + 8.5)` clamped to 15).
pub fn quantize(dtype: DType, src: &[f32], out: &mut Vec<u8>) -> Result<()> {
    let bs = dtype.block_size();
    if !src.len().is_multiple_of(bs) {
        return Err(Error::Invalid(format!(
            "{} values are not a whole number of {dtype:?} blocks of {bs}",
            src.len()
        )));
    }
    match dtype {
        DType::F32 => src.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => src
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => src
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => {
            for b in src.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        DType::Q4_0 => {
            for b in src.chunks_exact(32) {
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            }
        }
        _ => {
            return Err(Error::Unsupported(format!(
                "quantizing to {dtype:?} (supported: F32, F16, BF16, Q8_0, Q4_0)"
            )))
        }
    }
    Ok(())
}

/// Fills `out` (a whole tensor of `dtype`) with pseudo-random values of
/// order `scale`, like [`random_tensor_bytes`] but in place and fast enough
/// to synthesize models at disk speed: random codes eight bytes at a time,
/// then sane block scales.
pub fn fill_random_tensor(dtype: DType, out: &mut [u8], seed: u64, scale: f32) {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let unit = |z: u64| (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    match dtype {
        DType::F32 => out
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&(unit(next()) * scale).to_le_bytes())),
        DType::F16 => out
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&f16::from_f32(unit(next()) * scale).to_le_bytes())),
        DType::BF16 => out
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&bf16::from_f32(unit(next()) * scale).to_le_bytes())),
        // Codes of magnitude about `scale` (the tile scales, a separate
        // tensor, are the caller's).
        DType::FP8(_) => out
            .iter_mut()
            .for_each(|c| *c = crate::fp8::encode(unit(next()) * scale)),
        _ => {
            let mut chunks = out.chunks_exact_mut(8);
            for c in &mut chunks {
                c.copy_from_slice(&next().to_le_bytes());
            }
            let z = next().to_le_bytes();
            let rem = chunks.into_remainder();
            let n = rem.len();
            rem.copy_from_slice(&z[..n]);
            let d = scale / if dtype == DType::Q8_0 { 127.0 } else { 16.0 };
            let bb = dtype.block_bytes();
            if dtype == DType::MXFP4 {
                // Exponents within a factor 2 either side of `scale / 12`.
                let base = 128.0 + (scale / 12.0).max(1e-30).log2().round();
                for blk in out.chunks_exact_mut(bb) {
                    blk[0] = (base + (unit(next()) * 1.5).round()).clamp(2.0, 254.0) as u8;
                }
                return;
            }
            for blk in out.chunks_exact_mut(bb) {
                for (i, &o) in scale_field_offsets(dtype).iter().enumerate() {
                    let u = unit(next());
                    // Codes are offset (Q4_0 spans -8..7): a random sign on
                    // the block scale cancels the mean, which would otherwise
                    // bias every row the same way and make routing constant.
                    let sign = if i == 0 && u < 0.0 { -1.0 } else { 1.0 };
                    let v = f16::from_f32(sign * d * (0.25 + 0.75 * u.abs()));
                    blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxfp4_fast_path_equals_the_reference_blocks() {
        let mut raw = random_tensor_bytes(DType::MXFP4, 32 * 64, 7, 3.0);
        // Subnormal and large exponents too.
        raw[0] = 0;
        raw[17] = 1;
        raw[34] = 250;
        let mut fast = vec![0f32; 32 * 64];
        dequantize(DType::MXFP4, &raw, &mut fast).unwrap();
        let mut slow = vec![0f32; 32];
        for (b, y) in raw.chunks_exact(17).zip(fast.chunks_exact(32)) {
            mxfp4(b, &mut slow);
            assert_eq!(
                slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        assert_eq!(e8m0_half(128), 1.0);
        assert_eq!(e8m0_half(0), 2f32.powi(-128));
    }

    #[test]
    fn dequantize_rejects_wrong_lengths() {
        let mut y = vec![0.0; 32];
        assert!(dequantize(DType::Q8_0, &[0u8; 33], &mut y).is_err());
        let mut y = vec![0.0; 31];
        assert!(dequantize(DType::Q8_0, &[0u8; 34], &mut y).is_err());
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for dt in QUANTIZE_TARGETS {
            let mut b = Vec::new();
            quantize(*dt, &x, &mut b).unwrap();
            assert_eq!(b.len(), dt.row_bytes(x.len()).unwrap());
            let mut y = vec![0f32; x.len()];
            dequantize(*dt, &b, &mut y).unwrap();
            for blk in 0..x.len() / 32 {
                let r = blk * 32..blk * 32 + 32;
                let amax = x[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = match dt {
                    DType::Q8_0 => amax / 127.0,
                    // The clamp at code 15 costs up to a whole step.
                    DType::Q4_0 => amax / 8.0 * 2.0,
                    _ => amax / 128.0,
                };
                for i in r {
                    assert!(
                        (x[i] - y[i]).abs() <= step * 0.51 + 1e-6,
                        "{dt:?} {i}: {} vs {}",
                        x[i],
                        y[i]
                    );
                }
            }
        }
    }

    /// The AVX2 paths give exactly the scalar reference's bits.
    #[test]
    fn simd_dequantization_is_bit_identical() {
        for dt in [DType::Q4_0, DType::Q8_0] {
            for seed in 0..20u64 {
                let n = 32 * (1 + seed as usize % 9);
                let mut b = vec![0u8; dt.row_bytes(n).unwrap()];
                fill_random_tensor(dt, &mut b, seed, 3.0);
                let mut fast = vec![0f32; n];
                dequantize(dt, &b, &mut fast).unwrap();
                let mut slow = vec![0f32; n];
                let f = block_fn(dt);
                for (y, blk) in slow
                    .chunks_exact_mut(32)
                    .zip(b.chunks_exact(dt.block_bytes()))
                {
                    f(blk, y);
                }
                let same = fast
                    .iter()
                    .zip(&slow)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dt:?} seed {seed}");
            }
        }
    }

    #[test]
    fn random_fill_dequantizes_to_finite_values() {
        for dt in [
            DType::Q4_0,
            DType::Q8_0,
            DType::Q4_K,
            DType::Q6_K,
            DType::F16,
            DType::BF16,
        ] {
            let n = 512;
            let mut b = vec![0u8; dt.row_bytes(n).unwrap()];
            fill_random_tensor(dt, &mut b, 3, 0.1);
            let mut y = vec![0f32; n];
            dequantize(dt, &b, &mut y).unwrap();
            assert!(y.iter().all(|v| v.is_finite() && v.abs() < 100.0), "{dt:?}");
            assert!(y.iter().any(|v| *v != 0.0));
        }
    }
}

#[cfg(test)]
mod mlx_tests {
    use super::*;
    use proptest::prelude::*;

    /// Value `i` of a little-endian bit stream, read one bit at a time: an
    /// independent statement of MLX's packing.
    fn stream_value(bytes: &[u8], i: usize, bits: usize) -> u32 {
        (0..bits)
            .map(|b| {
                let at = i * bits + b;
                (((bytes[at / 8] >> (at % 8)) & 1) as u32) << b
            })
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn mlx_round_trip_is_within_half_a_step_and_packs_a_bit_stream(
            bits in proptest::sample::select(vec![2u32, 3, 4, 5, 6, 8]),
            group in proptest::sample::select(vec![32u32, 64, 128]),
            groups in 1usize..4,
            seed in any::<u64>(),
        ) {
            let q = MlxQuant::new(bits, group, HalfType::F32).unwrap();
            let n = groups * group as usize;
            let xb = random_tensor_bytes(DType::F32, n, seed, 3.0);
            let x: Vec<f32> = xb.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
            quantize_mlx(q, &x, &mut p, &mut s, &mut b).unwrap();
            prop_assert_eq!(p.len(), n * bits as usize / 8);
            let mut y = vec![0f32; n];
            dequantize_mlx(q, &p, &s, &b, &mut y).unwrap();
            let f = |v: &[u8], i: usize| f32::from_le_bytes(v[4 * i..4 * i + 4].try_into().unwrap());
            for i in 0..n {
                let g = i / group as usize;
                let (sc, bi) = (f(&s, g), f(&b, g));
                let code = stream_value(&p, i, bits as usize);
                prop_assert!(code < (1 << bits));
                prop_assert!((y[i] - (sc * code as f32 + bi)).abs() <= 1e-6 * (1.0 + y[i].abs()));
                // MLX anchors the grid at the group's extreme of larger
                // magnitude, so the other extreme may lie past the grid's
                // end: within half a step of the grid, or clipped to it.
                let top = bi + ((1u32 << bits) - 1) as f32 * sc;
                let (lo, hi) = (bi.min(top), bi.max(top));
                let outside = (lo - x[i]).max(x[i] - hi).max(0.0);
                prop_assert!(
                    (y[i] - x[i]).abs() <= 0.5 * sc.abs() * 1.001 + outside + 1e-5,
                    "{} vs {}", y[i], x[i]
                );
            }
            // Short inputs are an error, not a panic.
            prop_assert!(dequantize_mlx(q, &p[1..], &s, &b, &mut y).is_err());
        }
    }
}
