//! Block-scaled FP8 ([`Fp8Block`]): E4M3 codes, one scale per tile.
//!
//! A weight is its code's E4M3 value times its tile's scale, one f32
//! multiplication, which is how transformers dequantizes these checkpoints
//! (`Fp8Dequantize`: both sides in f32), so the products are exact against
//! the oracle's weights. The AVX2 decoder widens each code to the IEEE half
//! with the same bits (E4M3 is a half with a 4-bit exponent: its value
//! times 2⁻⁸) and converts in hardware, bit-identical to the table.

use crate::{DType, Error, Fp8Block, Fp8Scale, Result};
use half::{bf16, f16};

/// The value of every E4M3 code (`float8_e4m3fn`: bias 7, subnormals,
/// no infinities, NaN at `S.1111.111`).
pub static E4M3: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let sign = ((b as u32) >> 7) << 31;
        let e = ((b >> 3) & 15) as u32;
        let m = (b & 7) as u32;
        let bits = if e == 15 && m == 7 {
            0x7fc0_0000
        } else if e > 0 {
            ((e + 120) << 23) | (m << 20)
        } else if m == 0 {
            0
        } else {
            // Subnormal, m·2⁻⁹: normalize the leading bit of m.
            let p = if m >= 4 {
                2
            } else if m >= 2 {
                1
            } else {
                0
            };
            ((p + 118) << 23) | ((m - (1 << p)) << (23 - p))
        };
        t[b] = f32::from_bits(sign | bits);
        b += 1;
    }
    t
}

/// The scale at index `i` of a grid row stored as `t`.
#[inline]
fn scale_at(t: Fp8Scale, s: &[u8], i: usize) -> f32 {
    match t {
        Fp8Scale::F32 => f32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]),
        Fp8Scale::Bf16 => bf16::from_le_bytes([s[2 * i], s[2 * i + 1]]).to_f32(),
        Fp8Scale::F16 => f16::from_le_bytes([s[2 * i], s[2 * i + 1]]).to_f32(),
        Fp8Scale::E8M0 => e8m0(s[i]),
    }
}

/// `2^(b - 127)`, NaN for 255 (subnormal for `b = 0`).
fn e8m0(b: u8) -> f32 {
    match b {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits((b as u32) << 23),
    }
}

/// Appends the scales of one line of the grid (`line`, as stored) as f32.
pub fn line_f32(q: Fp8Block, line: &[u8], out: &mut Vec<f32>) {
    out.extend((0..line.len() / q.scales.bytes()).map(|i| scale_at(q.scales, line, i)));
}

/// Dequantizes one row of `cols` FP8 weights whose scales are `scales`
/// (the row's line of the scale grid).
pub fn dequantize(q: Fp8Block, codes: &[u8], scales: &[u8], dst: &mut [f32]) -> Result<()> {
    let n = dst.len();
    if codes.len() != n || scales.len() != q.aux_row_bytes(n) {
        return Err(Error::Invalid(format!(
            "dequantize {}: {n} values need {n} codes and {} bytes of scales, got {} and {}",
            DType::FP8(q),
            q.aux_row_bytes(n),
            codes.len(),
            scales.len()
        )));
    }
    dequantize_unchecked(q, codes, scales, 0, dst);
    Ok(())
}

/// Weights `c0..c0 + dst.len()` of a row: `codes` are theirs, `scales`
/// the row's whole line of the scale grid. Panics (never UB) when the
/// lengths disagree.
pub fn dequantize_unchecked(q: Fp8Block, codes: &[u8], scales: &[u8], c0: usize, dst: &mut [f32]) {
    assert_eq!(codes.len(), dst.len(), "FP8 codes and output lengths");
    let bc = q.block_cols as usize;
    let mut c = c0;
    while c < c0 + dst.len() {
        let end = ((c / bc + 1) * bc).min(c0 + dst.len());
        let s = scale_at(q.scales, scales, c / bc);
        decode(&codes[c - c0..end - c0], s, &mut dst[c - c0..end - c0]);
        c = end;
    }
}

/// `dst[i] = E4M3(codes[i]) · s`.
#[inline]
pub fn decode(codes: &[u8], s: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: AVX2 and F16C were detected just now.
        return unsafe { simd::decode(codes, s, dst) };
    }
    for (d, &c) in dst.iter_mut().zip(codes) {
        *d = E4M3[c as usize] * s;
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }

    /// # Safety
    /// AVX2 and F16C must be available.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn decode(codes: &[u8], s: f32, dst: &mut [f32]) {
        let n = codes.len().min(dst.len());
        let (scale, two8) = (_mm256_set1_ps(s), _mm256_set1_ps(256.0));
        let (sign, mag, nan) = (
            _mm_set1_epi16(0x80),
            _mm_set1_epi16(0x7f),
            _mm_set1_epi16(0x3f80),
        );
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n`, within both slices.
            let b = unsafe { _mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i) };
            let w = _mm_cvtepu8_epi16(b);
            let m = _mm_slli_epi16(_mm_and_si128(w, mag), 7);
            // S.1111.111 is NaN: give the half an all-ones exponent.
            let m = _mm_or_si128(
                m,
                _mm_and_si128(_mm_cmpeq_epi16(m, nan), _mm_set1_epi16(0x7c00)),
            );
            let h = _mm_or_si128(m, _mm_slli_epi16(_mm_and_si128(w, sign), 8));
            // The half is the value times 2⁻⁸; ×256 is exact, then one
            // rounding by the scale, as the table's path does.
            let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(h), two8), scale);
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), v) };
            i += 8;
        }
        for j in i..n {
            dst[j] = super::E4M3[codes[j] as usize] * s;
        }
    }
}

/// The E4M3 code nearest `x` (ties to the even code; beyond ±448 the
/// largest finite value, as a saturating cast does).
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    // Codes 0..=0x7e are the non-negative finite values, ascending.
    let i = E4M3[..0x7f].partition_point(|&v| v < a);
    let c = if i == 0 {
        0
    } else if i >= 0x7f {
        0x7e
    } else {
        let (lo, hi) = (E4M3[i - 1], E4M3[i]);
        if a - lo < hi - a || (a - lo == hi - a && (i - 1) % 2 == 0) {
            i - 1
        } else {
            i
        }
    };
    sign | c as u8
}

/// Quantizes a `rows × cols` matrix to FP8 tiles as the published
/// checkpoints are made: per tile, scale = max|x| / 448 (1 for an all-zero
/// tile), rounded to the scale type (E8M0: up to the next power of two,
/// as transformers' `ue8m0` does), codes the nearest E4M3 of `x / scale`.
/// Returns the codes and the scale grid.
pub fn quantize(q: Fp8Block, w: &[f32], rows: usize, cols: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    if w.len() != rows * cols {
        return Err(Error::Invalid(format!(
            "{} values are not a {rows}x{cols} matrix",
            w.len()
        )));
    }
    let (br, bc) = (q.block_rows as usize, q.block_cols as usize);
    let (gr, gc) = (rows.div_ceil(br), cols.div_ceil(bc));
    let mut codes = vec![0u8; rows * cols];
    let mut scales = Vec::with_capacity(gr * gc * q.scales.bytes());
    for i in 0..gr {
        for j in 0..gc {
            let (r0, r1, c0, c1) = (
                i * br,
                ((i + 1) * br).min(rows),
                j * bc,
                ((j + 1) * bc).min(cols),
            );
            let amax = (r0..r1)
                .flat_map(|r| &w[r * cols + c0..r * cols + c1])
                .fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / 448.0 } else { 1.0 };
            let s = match q.scales {
                Fp8Scale::F32 => {
                    scales.extend(s.to_le_bytes());
                    s
                }
                Fp8Scale::Bf16 => {
                    let h = bf16::from_f32(s);
                    scales.extend(h.to_le_bytes());
                    h.to_f32()
                }
                Fp8Scale::F16 => {
                    let h = f16::from_f32(s);
                    scales.extend(h.to_le_bytes());
                    h.to_f32()
                }
                Fp8Scale::E8M0 => {
                    let b = (s.log2().ceil() as i32 + 127).clamp(1, 254) as u8;
                    scales.push(b);
                    e8m0(b)
                }
            };
            for r in r0..r1 {
                for c in c0..c1 {
                    codes[r * cols + c] = encode(w[r * cols + c] / s);
                }
            }
        }
    }
    Ok((codes, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_format() {
        assert_eq!(E4M3[0x00], 0.0);
        assert_eq!(E4M3[0x80].to_bits(), (-0.0f32).to_bits());
        assert_eq!(E4M3[0x01], 2f32.powi(-9));
        assert_eq!(E4M3[0x07], 7.0 * 2f32.powi(-9));
        assert_eq!(E4M3[0x08], 2f32.powi(-6));
        assert_eq!(E4M3[0x38], 1.0);
        assert_eq!(E4M3[0x7e], 448.0);
        assert_eq!(E4M3[0xfe], -448.0);
        assert!(E4M3[0x7f].is_nan() && E4M3[0xff].is_nan());
        // Every finite code round-trips and the values ascend.
        for c in 0..=0x7eu8 {
            assert_eq!(encode(E4M3[c as usize]), c);
            assert_eq!(encode(-E4M3[c as usize]) & 0x7f, c);
            if c > 0 {
                assert!(E4M3[c as usize] > E4M3[c as usize - 1]);
            }
        }
        assert_eq!(encode(1e9), 0x7e);
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(120), 2f32.powi(-7));
        assert_eq!(e8m0(1), 2f32.powi(-126));
        assert_eq!(e8m0(0), 2f32.powi(-127));
        assert!(e8m0(255).is_nan());
        assert_eq!(encode(-1e9), 0xfe);
    }

    #[test]
    fn simd_decode_equals_the_table() {
        let codes: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for s in [1.0f32, 0.0123, 3.5e-3, -2.0, 1e-30] {
            let mut fast = vec![0f32; codes.len() - 3];
            decode(&codes[3..], s, &mut fast);
            for (&c, &v) in codes[3..].iter().zip(&fast) {
                let want = E4M3[c as usize] * s;
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "code {c:#x} scale {s}: {v} vs {want}"
                );
            }
        }
    }

    #[test]
    fn tiles_apply_their_scales_with_partial_edges() {
        let q = Fp8Block::new(2, 3, Fp8Scale::Bf16).unwrap();
        let (rows, cols) = (5, 7);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * (1.0 + (i / 9) as f32))
            .collect();
        let (codes, scales) = quantize(q, &w, rows, cols).unwrap();
        assert_eq!(scales.len(), 3 * 3 * 2);
        let ab = q.aux_row_bytes(cols);
        for r in 0..rows {
            let line = &scales[r / 2 * ab..(r / 2 + 1) * ab];
            let mut row = vec![0f32; cols];
            dequantize(q, &codes[r * cols..(r + 1) * cols], line, &mut row).unwrap();
            for c in 0..cols {
                let s = scale_at(q.scales, line, c / 3);
                assert_eq!(row[c], E4M3[codes[r * cols + c] as usize] * s);
                // E4M3 keeps 3 mantissa bits: within 1/16 relative, or a
                // subnormal step of the tile.
                let err = (row[c] - w[r * cols + c]).abs();
                assert!(
                    err <= w[r * cols + c].abs() / 16.0 + s * 2f32.powi(-9),
                    "{r},{c}"
                );
            }
            // A chunk starting mid-tile reads the same values.
            let mut part = vec![0f32; 4];
            dequantize_unchecked(q, &codes[r * cols + 2..r * cols + 6], line, 2, &mut part);
            assert_eq!(part, row[2..6]);
        }
        assert!(dequantize(q, &codes[..cols], &scales[..2], &mut [0f32; 7]).is_err());
    }
}
