//! x86-64 kernels: AVX2 (with FMA and F16C) and AVX-512 (F, BW, VL, VNNI,
//! VBMI).
//!
//! Both follow `fmt.rs`: per chunk of 16 units the row's `W` and `M` are
//! computed once (scalar, shared with every ISA), then each unit's codes
//! are unpacked in registers and multiplied with the activation bytes.
//! AVX-512 unpacks two units (64 codes) per step and multiplies with
//! `vpdpbusd`; AVX2 one unit per step with `vpmaddubsw`/`vpmaddwd`, which
//! saturates beyond 7-bit codes, so AVX2 reads 8-bit codes as signed
//! ([`Signed8::Yes`]). A step's 16 (or 8) lanes of 32-bit sums each cover
//! four codes of one half unit; the lane's scale `W·da` comes from the
//! chunk's table by a permute, and the `M` terms are one multiply-add per
//! chunk against the activations' half sums. Software prefetch runs 4 KiB
//! ahead: without it the kernels reach about half the read bandwidth, the
//! out-of-order window being too short to hide DRAM latency.

// Kernels index parallel arrays (rows × tokens of registers) by position.
#![allow(clippy::needless_range_loop)]

use super::fmt::{self, Row, Signed8, CHUNK, UNIT};
use super::{Out, Rows};
use crate::act::{ActRow, Layout, QAct};
use sluice_core::{DType, MlxQuant, WeightView};
use std::arch::x86_64::*;

/// Prefetch distance, bytes.
const AHEAD: usize = 4096;

/// Token rows one pass over a weight row serves.
const TOK: usize = 4;

/// Bytes of weight rows a prefill tile keeps in L2 across token groups.
const ROW_BLOCK_BYTES: usize = 256 << 10;

// ---------------------------------------------------------------- layouts

/// `perm` of the AVX-512 Q4/Q5 pair: the low nibbles of two blocks, then
/// their high nibbles.
static PAIRED: [u8; 64] = {
    let mut p = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        p[k] = match k / 16 {
            0 => k,
            1 => 32 + (k - 16),
            2 => 16 + (k - 32),
            _ => k,
        } as u8;
        k += 1;
    }
    p
};

/// AVX-512 MLX 4-bit pair: even values of both units, then odd ones.
static PAIRED_EVEN_ODD: [u8; 64] = {
    let mut p = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let (unit, odd, j) = ((k / 16) % 2, k / 32, k % 16);
        p[k] = (32 * unit + 2 * j + odd) as u8;
        k += 1;
    }
    p
};

/// AVX-512 MLX 2-bit pair: 128-bit lane `k` holds field `k` of the 8
/// bytes of each unit.
static PAIRED_FIELDS2: [u8; 64] = {
    let mut p = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let (lane, j) = (k / 16, k % 16);
        p[k] = (32 * (j / 8) + 4 * (j % 8) + lane) as u8;
        k += 1;
    }
    p
};

/// Where byte `k` of a pair's codes sits once widened to 16 bits by a
/// mask (the even bytes) and a shift (the odd bytes): each 32-bit lane of
/// the products then still sums the four bytes of one lane of the codes,
/// so the type's lane pattern holds, and no shuffle (port 5) is spent.
/// The 16-bit activations are stored in that order, composed with the
/// type's own byte order.
const fn unpacked(perm: Option<&[u8; 64]>) -> [u8; 64] {
    let mut out = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let (odd, j) = (k / 32, k % 32);
        let byte = 2 * j + odd;
        out[k] = match perm {
            Some(p) => p[byte],
            None => byte as u8,
        };
        k += 1;
    }
    out
}

/// The 16-bit orders of the natural and the permuted byte orders.
static WIDE_NATURAL: [u8; 64] = unpacked(None);
static WIDE_PAIRED: [u8; 64] = unpacked(Some(&PAIRED));
static WIDE_EVEN_ODD: [u8; 64] = unpacked(Some(&PAIRED_EVEN_ODD));

/// The activation order of the AVX-512 kernel for `dt`: 8-bit codes in the
/// order its codes unpack in, or, with the residual, 16-bit values in that
/// order as the widening leaves it.
pub fn avx512_layout(dt: DType, residual: bool) -> Layout {
    // The types `Unpack512::WIDE` leaves on two byte planes.
    let planes = matches!(dt, DType::Q2_K | DType::Q3_K | DType::Q6_K)
        || matches!(dt, DType::Mlx(q) if q.bits == 2);
    let residual_wide = residual && !planes;
    let perm: Option<&'static [u8]> = match (dt, residual_wide) {
        (DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::MXFP4, false) => {
            Some(&PAIRED)
        }
        (DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::MXFP4, true) => {
            Some(&WIDE_PAIRED)
        }
        (DType::Mlx(q), false) if q.bits == 4 => Some(&PAIRED_EVEN_ODD),
        (DType::Mlx(q), true) if q.bits == 4 => Some(&WIDE_EVEN_ODD),
        (DType::Mlx(q), false) if q.bits == 2 => Some(&PAIRED_FIELDS2),
        (_, true) => Some(&WIDE_NATURAL),
        (_, false) => None,
    };
    Layout {
        step: 2,
        perm,
        wide: residual_wide,
    }
}

// ---------------------------------------------------------------- helpers

/// Horizontal sum of eight floats.
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    // SAFETY: AVX is enabled in every caller (AVX2 implies it).
    unsafe {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }
}

/// Prefetches `len` bytes at `p + AHEAD` into L2.
#[inline(always)]
unsafe fn prefetch(p: *const u8, len: usize) {
    let mut o = 0;
    while o < len {
        // SAFETY: prefetches never fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD + o) as *const i8) };
        o += 64;
    }
}

#[inline(always)]
unsafe fn load16(p: *const u8) -> __m128i {
    // SAFETY: callers pass pointers with 16 readable bytes.
    unsafe { _mm_loadu_si128(p as *const __m128i) }
}

#[inline(always)]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: callers pass pointers with 32 readable bytes.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

#[inline(always)]
fn u32_at(p: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]])
}

/// Bytes a unit of `dt` occupies in a row (the pair's stride).
fn unit_bytes(dt: DType) -> usize {
    match dt {
        DType::Mlx(q) => 4 * q.bits as usize,
        DType::Q2_K => 84 / 8,
        DType::Q3_K => 110 / 8,
        DType::Q4_K => 144 / 8,
        DType::Q5_K => 176 / 8,
        DType::Q6_K => 210 / 8,
        _ => fmt::block_unit_bytes(dt),
    }
}

// ---------------------------------------------------------------- AVX-512

/// Lanes of a pair in the weights' order: unit 0, then unit 1.
const NATURAL_LANES: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
/// Lanes of a pair whose nibbles were split: [u0, u1, u0, u1] by quarters.
const PAIRED_LANES: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];
/// Half units in the weights' order.
const HALF_LANES: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];
/// MLX 2-bit pairs: each 128-bit lane is one 2-bit field of both units.
const FIELD_LANES: [i32; 16] = [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1];

/// A chunk's `W` and `M` in registers: per unit (`w[0]`, `m[0]`: 16
/// units) or, for types whose halves differ, per half unit (`w[0]` halves
/// 0..16, `w[1]` halves 16..32). Lanes past the chunk's units are zero.
#[derive(Clone, Copy)]
struct Head {
    w: [__m512; 2],
    m: [__m512; 2],
}

/// Two units' codes as one AVX-512 register, and a chunk's header.
trait Unpack512 {
    /// The table entry of each 32-bit lane of a pair's products, relative
    /// to the pair's first: the unit (0 or 1) for per-unit tables, the half
    /// unit (0 to 3) for per-half ones.
    const LANES: [i32; 16];
    /// `W`/`M` differ between the halves of a unit.
    const PER_HALF: bool = false;
    /// With the residual: 16-bit activations (`pair_sums`), or two byte
    /// planes, which measured faster for the per-half types and MLX 2-bit
    /// (their unpacking already loads port 0, where the widening adds).
    const WIDE: bool = !Self::PER_HALF;
    /// `W` and `M` of units `c0..c0 + n` (see `fmt::header`).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be enabled; the units lie in `row`.
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, q: Option<MlxQuant>) -> Head;
    /// The 64 codes of units `u` and `u + 1` (`u` even) of `row`, in the
    /// order of [`avx512_layout`].
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VBMI must be enabled; both units lie in `row`.
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m512i;
}

#[inline(always)]
fn u16_at(p: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([p[i], p[i + 1]])
}

/// Header of the 32-weight block types: one f16 scale per unit, and a
/// zero point (`zero`) or an f16 min after the scale. The scales are
/// gathered straight into a register (16 scalar stores read back as one
/// vector would stall on store forwarding).
#[inline(always)]
unsafe fn block_head(b: &[u8], c0: usize, n: usize, bb: usize, zero: Option<f32>) -> Head {
    assert!((c0 + n) * bb <= b.len() && n <= 16);
    // SAFETY: the masked gather reads the first 4 bytes of each of the `n`
    // blocks, which lie in `b` (checked; a block is at least 18 bytes);
    // AVX-512F per contract.
    unsafe {
        let k = ((1u32 << n) - 1) as u16;
        let off = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(bb as i32),
        );
        let base = b.as_ptr().add(c0 * bb);
        let g =
            _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), k, off, base as *const i32);
        let w = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
        let mv = match zero {
            Some(z) => _mm512_mul_ps(w, _mm512_set1_ps(z)),
            None => _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))),
        };
        let z = _mm512_setzero_ps();
        Head {
            w: [w, z],
            m: [mv, z],
        }
    }
}

/// Q4_0 and Q4_1 (`AT` = offset of the nibbles, `BB` = block bytes).
struct Q4<const BB: usize, const AT: usize>;
impl<const BB: usize, const AT: usize> Unpack512 for Q4<BB, AT> {
    const LANES: [i32; 16] = PAIRED_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { block_head(row.data, c0, n, BB, (AT == 2).then_some(-8.0)) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        assert!((u + 2) * BB <= row.len());
        // SAFETY: both blocks are in `row` (checked); features per contract.
        unsafe {
            let p = row.as_ptr().add(u * BB + AT);
            let y =
                _mm256_inserti128_si256(_mm256_castsi128_si256(load16(p)), load16(p.add(BB)), 1);
            let z = _mm512_inserti64x4(_mm512_castsi256_si512(y), _mm256_srli_epi16(y, 4), 1);
            _mm512_and_si512(z, _mm512_set1_epi8(15))
        }
    }
}

/// MXFP4: Q4_0's nibble layout (17-byte blocks, codes at 1), each nibble
/// looked up to its code (`fmt::MXFP4_CODES`), and an E8M0 exponent byte as
/// the scale.
struct Mxfp4;
impl Unpack512 for Mxfp4 {
    const LANES: [i32; 16] = PAIRED_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        let b = row.data;
        assert!((c0 + n) * 17 <= b.len() && n <= 16);
        // The masked gather reads the first 4 bytes of the `n` blocks.
        // SAFETY: those blocks lie in `b` (checked); AVX-512F per contract.
        unsafe {
            let k = ((1u32 << n) - 1) as u16;
            let off = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(17),
            );
            let base = b.as_ptr().add(c0 * 17);
            let g = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                k,
                off,
                base as *const i32,
            );
            let e = _mm512_and_si512(g, _mm512_set1_epi32(255));
            // 2^(e - 128) (`quant::e8m0_half`): an exponent field of e - 1,
            // or, below e = 2, the subnormal 0x200000 << e.
            let normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
            let small = _mm512_sllv_epi32(_mm512_set1_epi32(0x0020_0000), e);
            let lt2 = _mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2));
            let w = _mm512_castsi512_ps(_mm512_mask_blend_epi32(lt2, normal, small));
            let w = _mm512_maskz_mov_ps(k, w);
            let z = _mm512_setzero_ps();
            Head {
                w: [w, z],
                m: [_mm512_mul_ps(w, _mm512_set1_ps(-12.0)), z],
            }
        }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m512i {
        // SAFETY: per contract; `Q4::codes` checks the bounds.
        unsafe {
            let nib = <Q4<17, 1> as Unpack512>::codes(row, u, q);
            let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(
                fmt::MXFP4_CODES.as_ptr() as *const __m128i
            ));
            _mm512_shuffle_epi8(lut, nib)
        }
    }
}

/// Q5_0 and Q5_1 (`QH` = offset of the high bits, `AT` of the nibbles).
struct Q5<const BB: usize, const QH: usize, const AT: usize>;
impl<const BB: usize, const QH: usize, const AT: usize> Unpack512 for Q5<BB, QH, AT> {
    const LANES: [i32; 16] = PAIRED_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { block_head(row.data, c0, n, BB, (QH == 2).then_some(-16.0)) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m512i {
        // SAFETY: per contract; `Q4::codes` checks the bounds.
        unsafe {
            let lo = <Q4<BB, AT> as Unpack512>::codes(row, u, q);
            let (h0, h1) = (
                u32_at(row, u * BB + QH) as u64,
                u32_at(row, (u + 1) * BB + QH) as u64,
            );
            let m = (h0 & 0xffff) | (h1 & 0xffff) << 16 | (h0 >> 16) << 32 | (h1 >> 16) << 48;
            _mm512_or_si512(lo, _mm512_maskz_mov_epi8(m, _mm512_set1_epi8(16)))
        }
    }
}

struct Q8;
impl Unpack512 for Q8 {
    const LANES: [i32; 16] = NATURAL_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { block_head(row.data, c0, n, 34, Some(-128.0)) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        assert!((u + 2) * 34 <= row.len());
        // SAFETY: both blocks are in `row` (checked); features per contract.
        unsafe {
            let p = row.as_ptr().add(u * 34 + 2);
            let z = _mm512_inserti64x4(_mm512_castsi256_si512(load32(p)), load32(p.add(34)), 1);
            _mm512_xor_si512(z, _mm512_set1_epi8(-128))
        }
    }
}

/// 16-bit lane shifts: `a` for the low 256 bits, `b` for the high.
#[inline(always)]
unsafe fn shifts(a: u32, b: u32) -> __m512i {
    // SAFETY: AVX-512F per the callers' contract.
    unsafe { _mm512_inserti64x4(_mm512_set1_epi16(a as i16), _mm256_set1_epi16(b as i16), 1) }
}

/// `(x >> s) & mask` per byte of the 32 bytes at `p`, duplicated into both
/// halves with shifts `a` and `b` (the mask must fit in `8 - shift` bits).
#[inline(always)]
unsafe fn fields(p: *const u8, a: u32, b: u32, mask: i8) -> __m512i {
    // SAFETY: 32 readable bytes at `p`; AVX-512F/BW per contract.
    unsafe {
        let z = _mm512_broadcast_i64x4(load32(p));
        _mm512_and_si512(_mm512_srlv_epi16(z, shifts(a, b)), _mm512_set1_epi8(mask))
    }
}

/// Sixteen signed bytes to floats.
#[inline(always)]
unsafe fn i8x16_ps(p: *const u8) -> __m512 {
    // SAFETY: 16 readable bytes at `p`; AVX-512F per contract.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p))) }
}

struct Q2K;
impl Unpack512 for Q2K {
    const LANES: [i32; 16] = HALF_LANES;
    const PER_HALF: bool = true;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: each super-block's 16 scale bytes lie in the row.
        unsafe {
            let z = _mm512_setzero_ps();
            let mut h = Head {
                w: [z, z],
                m: [z, z],
            };
            for s in 0..n / 8 {
                let blk = &row.data[(c0 / 8 + s) * 84..][..84];
                let sc = _mm512_cvtepu8_epi32(load16(blk.as_ptr()));
                let (d, dmin) = (half(blk, 80), half(blk, 82));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(15)));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4));
                h.w[s] = _mm512_mul_ps(lo, _mm512_set1_ps(d));
                h.m[s] = _mm512_mul_ps(hi, _mm512_set1_ps(-dmin));
            }
            h
        }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let blk = &row[(u / 8) * 84..][..84];
        let su = u % 8;
        let s = 2 * (su % 4) as u32;
        // SAFETY: the 32 bytes lie in the block; features per contract.
        unsafe { fields(blk[16 + 32 * (su / 4)..].as_ptr(), s, s + 2, 3) }
    }
}

struct Q3K;
impl Unpack512 for Q3K {
    const LANES: [i32; 16] = HALF_LANES;
    const PER_HALF: bool = true;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: the unpacked scales are a local array.
        unsafe {
            let z = _mm512_setzero_ps();
            let mut h = Head {
                w: [z, z],
                m: [z, z],
            };
            for s in 0..n / 8 {
                let blk = &row.data[(c0 / 8 + s) * 110..][..110];
                let sc = fmt::q3k_scales(&blk[96..108]);
                let d = half(blk, 108);
                let v = _mm512_sub_ps(i8x16_ps(sc.as_ptr() as *const u8), _mm512_set1_ps(32.0));
                h.w[s] = _mm512_mul_ps(v, _mm512_set1_ps(d));
                h.m[s] = _mm512_mul_ps(h.w[s], _mm512_set1_ps(-4.0));
            }
            h
        }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let blk = &row[(u / 8) * 110..][..110];
        let su = u % 8;
        let (n, j) = (su / 4, (su % 4) as u32);
        let bit = 4 * n as u32 + j;
        // SAFETY: both 32-byte ranges lie in the block; features per contract.
        unsafe {
            let q = fields(blk[32 + 32 * n..].as_ptr(), 2 * j, 2 * j + 2, 3);
            let h = fields(blk.as_ptr(), bit, bit + 1, 1);
            _mm512_or_si512(q, _mm512_slli_epi16(h, 2))
        }
    }
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K super-block, one byte
/// each in a word (ggml's unpacking of the 12-byte array, on 32-bit
/// words).
#[inline(always)]
fn k4_scales(q: &[u8]) -> (u64, u64) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let (u0, u1, u2) = (u32_at(q, 0), u32_at(q, 4), u32_at(q, 8));
    let u3 = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    let s1 = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let s0 = u0 & K1;
    let m0 = u1 & K1;
    ((s1 as u64) << 32 | s0 as u64, (u3 as u64) << 32 | m0 as u64)
}

/// The sixteen bytes of two words as floats.
#[inline(always)]
unsafe fn u8x16_ps(v: [u64; 2]) -> __m512 {
    // SAFETY: AVX-512F per contract.
    unsafe {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(
            v[1] as i64,
            v[0] as i64,
        )))
    }
}

/// Header of Q4_K and Q5_K (per unit: a sub-block is a unit). The bytes
/// go from general registers to vector ones directly (stores read back
/// as a vector would stall on store forwarding), the halves through F16C.
#[inline(always)]
unsafe fn k4_head(b: &[u8], c0: usize, n: usize, bb: usize) -> Head {
    let (mut sc, mut mn) = ([0u64; 2], [0u64; 2]);
    // (d, dmin) of both super-blocks as four halves.
    let mut dd = 0u64;
    for s in 0..n / 8 {
        let blk = &b[(c0 / 8 + s) * bb..][..bb];
        (sc[s], mn[s]) = k4_scales(&blk[4..16]);
        dd |= (u32_at(blk, 0) as u64) << (32 * s);
    }
    // SAFETY: AVX-512F/DQ and F16C per contract.
    unsafe {
        let f = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(dd as i64)));
        let d = _mm512_permutexvar_ps(
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
            f,
        );
        let dmin = _mm512_permutexvar_ps(
            _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
            f,
        );
        let z = _mm512_setzero_ps();
        Head {
            w: [_mm512_mul_ps(u8x16_ps(sc), d), z],
            m: [_mm512_sub_ps(z, _mm512_mul_ps(u8x16_ps(mn), dmin)), z],
        }
    }
}

/// The half at byte `i` of `b`, through F16C.
#[inline(always)]
unsafe fn half(b: &[u8], i: usize) -> f32 {
    // SAFETY: F16C per contract.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16_at(b, i) as i32))) }
}

struct Q4K;
impl Unpack512 for Q4K {
    const LANES: [i32; 16] = NATURAL_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { k4_head(row.data, c0, n, 144) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let blk = &row[(u / 8) * 144..][..144];
        let su = u % 8;
        // SAFETY: the 32 bytes lie in the block; features per contract.
        unsafe { fields(blk[16 + 32 * (su / 2)..].as_ptr(), 0, 4, 15) }
    }
}

struct Q5K;
impl Unpack512 for Q5K {
    const LANES: [i32; 16] = NATURAL_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { k4_head(row.data, c0, n, 176) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let blk = &row[(u / 8) * 176..][..176];
        let su = (u % 8) as u32;
        // SAFETY: both 32-byte ranges lie in the block; features per contract.
        unsafe {
            let q = fields(blk[48 + 32 * (su as usize / 2)..].as_ptr(), 0, 4, 15);
            let h = fields(blk[16..].as_ptr(), su, su + 1, 1);
            _mm512_or_si512(q, _mm512_slli_epi16(h, 4))
        }
    }
}

struct Q6K;
impl Unpack512 for Q6K {
    const LANES: [i32; 16] = HALF_LANES;
    const PER_HALF: bool = true;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, _: Option<MlxQuant>) -> Head {
        // SAFETY: each super-block's 16 scale bytes lie in the row.
        unsafe {
            let z = _mm512_setzero_ps();
            let mut h = Head {
                w: [z, z],
                m: [z, z],
            };
            for s in 0..n / 8 {
                let blk = &row.data[(c0 / 8 + s) * 210..][..210];
                let d = half(blk, 208);
                h.w[s] = _mm512_mul_ps(i8x16_ps(blk[192..].as_ptr()), _mm512_set1_ps(d));
                h.m[s] = _mm512_mul_ps(h.w[s], _mm512_set1_ps(-32.0));
            }
            h
        }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let blk = &row[(u / 8) * 210..][..210];
        let su = u % 8;
        let (n, k) = (su / 4, (su % 4) as u32);
        // SAFETY: the 64 bytes of ql and 32 of qh lie in the block;
        // features per contract.
        unsafe {
            let ql = _mm512_loadu_si512(blk[64 * n..].as_ptr() as *const _);
            let s = 4 * (k / 2);
            let lo = _mm512_and_si512(_mm512_srlv_epi16(ql, shifts(s, s)), _mm512_set1_epi8(15));
            let h = fields(blk[128 + 32 * n..].as_ptr(), 2 * k, 2 * k + 2, 3);
            _mm512_or_si512(lo, _mm512_slli_epi16(h, 4))
        }
    }
}

/// Per width: the source byte of each output byte (eight values of
/// `bits` bits are `bits` bytes, one 64-bit lane each).
static MLX_GATHER: [[u8; 64]; 9] = {
    let mut t = [[0u8; 64]; 9];
    let mut b = 1;
    while b <= 8 {
        let mut k = 0;
        while k < 64 {
            let j = k % 8;
            t[b][k] = ((k / 8) * b + if j < b { j } else { b - 1 }) as u8;
            k += 1;
        }
        b += 1;
    }
    t
};

/// Per width: the bit offset of each output byte within its 64-bit lane.
static MLX_SHIFT: [[u8; 64]; 9] = {
    let mut t = [[0u8; 64]; 9];
    let mut b = 1;
    while b <= 8 {
        let mut k = 0;
        while k < 64 {
            t[b][k] = ((k % 8) * b) as u8;
            k += 1;
        }
        b += 1;
    }
    t
};

/// Per units per group (1, 2, 4): each unit's group within a chunk.
static GROUP_OF: [[i32; 16]; 5] = {
    let mut t = [[0i32; 16]; 5];
    let mut per = 1;
    while per <= 4 {
        let mut u = 0;
        while u < 16 {
            t[per][u] = (u / per) as i32;
            u += 1;
        }
        per *= 2;
    }
    t
};

/// `k` values of an MLX scale or bias tensor from index `g0`, as floats.
#[inline(always)]
unsafe fn aux16(t: sluice_core::HalfType, b: &[u8], g0: usize, k: usize) -> __m512 {
    let m = ((1u32 << k) - 1) as u16;
    // SAFETY: masked loads read only the `k` values, which lie in `b`
    // (checked by the slicing); AVX-512F/BW per contract.
    unsafe {
        match t {
            sluice_core::HalfType::F32 => {
                let p = b[4 * g0..4 * (g0 + k)].as_ptr();
                _mm512_maskz_loadu_ps(m, p as *const f32)
            }
            sluice_core::HalfType::Bf16 => {
                let p = b[2 * g0..2 * (g0 + k)].as_ptr();
                let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
            sluice_core::HalfType::F16 => {
                let p = b[2 * g0..2 * (g0 + k)].as_ptr();
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
            }
        }
    }
}

/// MLX values of `bits` bits: eight values are `bits` bytes, so each
/// 64-bit lane gathers its bytes (`vpermb`) and `vpmultishiftqb` cuts the
/// eight fields out, in the weights' order.
struct Mlx;
impl Unpack512 for Mlx {
    const LANES: [i32; 16] = NATURAL_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, q: Option<MlxQuant>) -> Head {
        let q = q.expect("MLX quantization");
        let per = q.group as usize / UNIT;
        let (g0, k) = (c0 / per, n.div_ceil(per));
        // SAFETY: `aux16` reads `k` values inside the row's tensors.
        unsafe {
            let idx = _mm512_loadu_si512(GROUP_OF[per].as_ptr() as *const _);
            let s = _mm512_permutexvar_ps(idx, aux16(q.scales, row.scales, g0, k));
            let b = _mm512_permutexvar_ps(idx, aux16(q.scales, row.biases, g0, k));
            // Units past `n` are zero.
            let keep = ((1u32 << n) - 1) as u16;
            let z = _mm512_setzero_ps();
            Head {
                w: [_mm512_maskz_mov_ps(keep, s), z],
                m: [_mm512_maskz_mov_ps(keep, b), z],
            }
        }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m512i {
        let bits = q.map_or(4, |q| q.bits as usize);
        let len = 8 * bits;
        let src = &row[u * 4 * bits..][..len];
        let (idx, ctl) = (&MLX_GATHER[bits], &MLX_SHIFT[bits]);
        // SAFETY: the masked load reads exactly `len` (≤ 64) bytes of
        // `src`; features per contract.
        unsafe {
            let m = if len == 64 {
                u64::MAX
            } else {
                (1u64 << len) - 1
            };
            let z = _mm512_maskz_loadu_epi8(m, src.as_ptr() as *const i8);
            if bits == 8 {
                return z;
            }
            let g = _mm512_permutexvar_epi8(_mm512_loadu_si512(idx.as_ptr() as *const _), z);
            let f = _mm512_multishift_epi64_epi8(_mm512_loadu_si512(ctl.as_ptr() as *const _), g);
            _mm512_and_si512(f, _mm512_set1_epi8(((1u32 << bits) - 1) as i8))
        }
    }
}

/// MLX 4-bit: both units' 32 bytes in both halves, the upper half
/// shifted: [u0 even values, u1 even, u0 odd, u1 odd].
struct Mlx4;
impl Unpack512 for Mlx4 {
    const LANES: [i32; 16] = PAIRED_LANES;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, q: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { Mlx::head(row, c0, n, q) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let src = &row[u * 16..][..32];
        // SAFETY: 32 bytes of `src`; features per contract.
        unsafe {
            let z = _mm512_broadcast_i64x4(load32(src.as_ptr()));
            let z = _mm512_mask_srli_epi16(z, 0xffff_0000, z, 4);
            _mm512_and_si512(z, _mm512_set1_epi8(15))
        }
    }
}

/// MLX 2-bit: both units' 16 bytes in each 128-bit lane, lane `k` holding
/// the field `k` of each byte.
struct Mlx2;
impl Unpack512 for Mlx2 {
    const LANES: [i32; 16] = FIELD_LANES;
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn head(row: Row<'_>, c0: usize, n: usize, q: Option<MlxQuant>) -> Head {
        // SAFETY: per contract.
        unsafe { Mlx::head(row, c0, n, q) }
    }
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m512i {
        let src = &row[u * 8..][..16];
        // SAFETY: 16 bytes of `src`; features per contract.
        unsafe {
            let z = _mm512_broadcast_i32x4(load16(src.as_ptr()));
            let sh = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_inserti128_si256(
                    _mm256_set1_epi16(0),
                    _mm_set1_epi16(2),
                    1,
                )),
                _mm256_inserti128_si256(_mm256_set1_epi16(4), _mm_set1_epi16(6), 1),
                1,
            );
            _mm512_and_si512(_mm512_srlv_epi16(z, sh), _mm512_set1_epi8(3))
        }
    }
}

/// Rows `r0..r1` of a quantized `w` against `act`, AVX-512.
///
/// # Safety
/// The CPU must support [`super::Isa::Avx512`]; `act` was made with
/// [`avx512_layout`]; `out` rows `r0..r1` belong to the caller.
pub unsafe fn avx512_q8_tile(w: &WeightView<'_>, r0: usize, r1: usize, act: &QAct, out: Out) {
    // SAFETY: forwarded contract.
    unsafe {
        if act.residual {
            avx512_dispatch::<true>(w, r0, r1, act, out)
        } else {
            avx512_dispatch::<false>(w, r0, r1, act, out)
        }
    }
}

/// [`avx512_q8_tile`] with the residual plane (`RES`) or without.
unsafe fn avx512_dispatch<const RES: bool>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    act: &QAct,
    out: Out,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match w.dtype {
            DType::Q4_0 => tile512::<Q4<18, 2>, RES>(w, r0, r1, act, out),
            DType::Q4_1 => tile512::<Q4<20, 4>, RES>(w, r0, r1, act, out),
            DType::Q5_0 => tile512::<Q5<22, 2, 6>, RES>(w, r0, r1, act, out),
            DType::Q5_1 => tile512::<Q5<24, 4, 8>, RES>(w, r0, r1, act, out),
            DType::Q8_0 => tile512::<Q8, RES>(w, r0, r1, act, out),
            DType::Q2_K => tile512::<Q2K, RES>(w, r0, r1, act, out),
            DType::Q3_K => tile512::<Q3K, RES>(w, r0, r1, act, out),
            DType::Q4_K => tile512::<Q4K, RES>(w, r0, r1, act, out),
            DType::Q5_K => tile512::<Q5K, RES>(w, r0, r1, act, out),
            DType::Q6_K => tile512::<Q6K, RES>(w, r0, r1, act, out),
            DType::Mlx(q) if q.bits == 4 => tile512::<Mlx4, RES>(w, r0, r1, act, out),
            DType::Mlx(q) if q.bits == 2 => tile512::<Mlx2, RES>(w, r0, r1, act, out),
            DType::Mlx(_) => tile512::<Mlx, RES>(w, r0, r1, act, out),
            DType::MXFP4 => tile512::<Mxfp4, RES>(w, r0, r1, act, out),
            DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => {
                unreachable!("float and FP8 weights take the f32 path")
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn tile512<U: Unpack512, const RES: bool>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    act: &QAct,
    out: Out,
) {
    let units = w.cols / UNIT;
    let mut scratch = Vec::new();
    // Rows in blocks that stay in L2 while every token group passes over
    // them. Tokens in groups of four (one pass over a row serves four);
    // single tokens two rows at a time (two independent streams of work,
    // the activations loaded once for both).
    let rows = Rows::new(w);
    let rb = (ROW_BLOCK_BYTES / rows.row_bytes().max(1)).max(2);
    for b0 in (r0..r1).step_by(rb) {
        let b1 = (b0 + rb).min(r1);
        let mut t0 = 0;
        while t0 < act.n {
            // Two or three tokens left: one pass for four, the last one
            // repeated (its sums discarded), beats a pass per token.
            let nt = (act.n - t0).min(TOK);
            if nt >= 2 {
                let acts: [ActRow<'_>; TOK] = std::array::from_fn(|i| act.row(t0 + i.min(nt - 1)));
                let mut r = b0;
                while r + 2 <= b1 {
                    // SAFETY: features enabled here; the rows and
                    // activations have the shapes the dispatch checked.
                    let s = unsafe {
                        rows512::<U, RES, 2, TOK>(
                            w.dtype,
                            [rows.row(r), rows.row(r + 1)],
                            units,
                            &acts,
                            &mut scratch,
                        )
                    };
                    for (k, sr) in s.iter().enumerate() {
                        for (i, v) in sr.iter().take(nt).enumerate() {
                            // SAFETY: the caller owns rows r0..r1 of `out`.
                            unsafe { out.put(t0 + i, r + k, *v) };
                        }
                    }
                    r += 2;
                }
                if r < b1 {
                    // SAFETY: as above.
                    let s = unsafe {
                        rows512::<U, RES, 1, TOK>(
                            w.dtype,
                            [rows.row(r)],
                            units,
                            &acts,
                            &mut scratch,
                        )
                    };
                    for (i, v) in s[0].iter().take(nt).enumerate() {
                        // SAFETY: the caller owns rows r0..r1 of `out`.
                        unsafe { out.put(t0 + i, r, *v) };
                    }
                }
                t0 += nt;
            } else {
                let acts = [act.row(t0)];
                let mut r = b0;
                while r + 2 <= b1 {
                    // SAFETY: as above.
                    let s = unsafe {
                        decode2::<U, RES>(
                            w.dtype,
                            [rows.row(r), rows.row(r + 1)],
                            units,
                            &acts[0],
                            &mut scratch,
                        )
                    };
                    // SAFETY: the caller owns rows r0..r1 of `out`.
                    unsafe {
                        out.put(t0, r, s[0]);
                        out.put(t0, r + 1, s[1]);
                    }
                    r += 2;
                }
                if r < b1 {
                    // SAFETY: as above.
                    let s = unsafe {
                        rows512::<U, RES, 1, 1>(w.dtype, [rows.row(r)], units, &acts, &mut scratch)
                    };
                    // SAFETY: the caller owns rows r0..r1 of `out`.
                    unsafe { out.put(t0, r, s[0][0]) };
                }
                t0 += 1;
            }
        }
    }
}

/// Pair `p` of the chunk at unit `c0` of `R` rows: the codes times each
/// token's activations, scaled per lane (from `lo`/`hi`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step_pair<U: Unpack512, const RES: bool, const R: usize, const T: usize>(
    p: usize,
    c0: usize,
    codes: [__m512i; R],
    acts: &[ActRow<'_>; T],
    lo: [[__m512; T]; R],
    hi: [[__m512; T]; R],
    mut acc: [[__m512; T]; R],
) -> [[__m512; T]; R] {
    let u = c0 + 2 * p;
    // SAFETY: the caller (inlined into `tile512`) has the features; the
    // activation rows hold the pair's values (units padded to pairs).
    unsafe {
        for t in 0..T {
            for r in 0..R {
                let s = pair_sums::<U, RES>(codes[r], &acts[t], u);
                let l = pair_scales::<U>(p, lo[r][t], hi[r][t]);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), l, acc[r][t]);
            }
        }
        acc
    }
}

/// The codes of the pair at unit `u` of each row (a lone last unit is
/// copied next to zeros first).
#[inline(always)]
unsafe fn pair_codes<U: Unpack512, const R: usize>(
    rows: &[Row<'_>; R],
    u: usize,
    end: usize,
    ub: usize,
    mlx: Option<MlxQuant>,
    scratch: &mut Vec<u8>,
) -> [__m512i; R] {
    // SAFETY: per the callers' contract (features; the units lie in the
    // rows, the scratch holds a unit and zeros).
    unsafe {
        if u + 1 < end {
            let mut c = [_mm512_setzero_si512(); R];
            for r in 0..R {
                c[r] = U::codes(rows[r].data, u, mlx);
            }
            c
        } else {
            let mut c = [_mm512_setzero_si512(); R];
            for (r, row) in rows.iter().enumerate() {
                scratch.clear();
                scratch.extend_from_slice(&row.data[u * ub..(u + 1) * ub]);
                scratch.resize(2 * ub + 64, 0);
                c[r] = U::codes(scratch, 0, mlx);
            }
            c
        }
    }
}

/// The 32-bit sums of the pair at unit `u` (codes `c`) with one row of
/// activations: `Σc·q` with 8-bit activations; with the residual, for
/// [`Unpack512::WIDE`] types the codes widened to 16 bits (even bytes by a
/// mask, odd bytes by a shift, see `unpacked`) and two `vpdpwssd` with
/// `256·q + r`, else `256·Σc·q + Σc·r` from the two byte planes.
#[inline(always)]
unsafe fn pair_sums<U: Unpack512, const RES: bool>(
    c: __m512i,
    a: &ActRow<'_>,
    u: usize,
) -> __m512i {
    // SAFETY: per the callers' contract (features; the pair's activations
    // lie in the row, units padded to pairs).
    unsafe {
        if RES && U::WIDE {
            let wl = _mm512_and_si512(c, _mm512_set1_epi16(0xff));
            let wh = _mm512_srli_epi16(c, 8);
            let p = a.wide.as_ptr().add(u * UNIT);
            let s = _mm512_dpwssd_epi32(
                _mm512_setzero_si512(),
                wl,
                _mm512_loadu_si512(p as *const _),
            );
            _mm512_dpwssd_epi32(s, wh, _mm512_loadu_si512(p.add(32) as *const _))
        } else {
            let q = _mm512_loadu_si512(a.qs.as_ptr().add(u * UNIT) as *const _);
            let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, q);
            if RES {
                let r = _mm512_loadu_si512(a.res.as_ptr().add(u * UNIT) as *const _);
                _mm512_dpbusd_epi32(_mm512_slli_epi32(s, 8), c, r)
            } else {
                s
            }
        }
    }
}

/// The lanes' scales of pair `p` of a chunk, from its table (`lo`, and
/// `hi` for per-half types), through the type's lane pattern.
#[inline(always)]
unsafe fn pair_scales<U: Unpack512>(p: usize, lo: __m512, hi: __m512) -> __m512 {
    // SAFETY: AVX-512F per the callers' contract.
    unsafe {
        let lanes = _mm512_loadu_si512(U::LANES.as_ptr() as *const _);
        if U::PER_HALF {
            _mm512_permutex2var_ps(
                lo,
                _mm512_add_epi32(lanes, _mm512_set1_epi32(4 * p as i32)),
                hi,
            )
        } else {
            _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(2 * p as i32)), lo)
        }
    }
}

/// Two rows against one token, the decode case, written with one named
/// register per value: through the generic `rows512`, LLVM kept the
/// accumulators on the stack (a store and a reload in every multiply-add's
/// dependency chain).
#[inline(always)]
unsafe fn decode2<U: Unpack512, const RES: bool>(
    dt: DType,
    rows: [Row<'_>; 2],
    units: usize,
    a: &ActRow<'_>,
    scratch: &mut Vec<u8>,
) -> [f32; 2] {
    let mlx = match dt {
        DType::Mlx(q) => Some(q),
        _ => None,
    };
    let ub = unit_bytes(dt);
    // SAFETY: every intrinsic needs only `tile512`'s features; loads stay
    // inside the rows and the activation row (masked past its units).
    unsafe {
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut b0, mut b1, mut k0, mut k1) = (z, z, z, z, z, z);
        let dup_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
        let mut c0 = 0;
        while c0 < units {
            let n = (units - c0).min(CHUNK);
            let ne = n.next_multiple_of(2).min(CHUNK);
            let um = ((1u32 << ne) - 1) as u16;
            let (h0, h1) = (U::head(rows[0], c0, n, mlx), U::head(rows[1], c0, n, mlx));
            prefetch(rows[0].data.as_ptr().add(c0 * ub), n * ub);
            prefetch(rows[1].data.as_ptr().add(c0 * ub), n * ub);
            let da = _mm512_maskz_loadu_ps(um, a.da.as_ptr().add(c0));
            let (l0, m0, l1, m1);
            if U::PER_HALF {
                let (dl, dh) = (
                    _mm512_permutexvar_ps(dup_lo, da),
                    _mm512_permutexvar_ps(dup_hi, da),
                );
                (l0, m0) = (_mm512_mul_ps(h0.w[0], dl), _mm512_mul_ps(h0.w[1], dh));
                (l1, m1) = (_mm512_mul_ps(h1.w[0], dl), _mm512_mul_ps(h1.w[1], dh));
                let halves = 2 * ne;
                let q0 = ((1u32 << halves.min(16)) - 1) as u16;
                let q1 = ((1u32 << halves.saturating_sub(16)) - 1) as u16;
                let al = _mm512_maskz_loadu_ps(q0, a.ah.as_ptr().add(2 * c0));
                let ah = _mm512_maskz_loadu_ps(q1, a.ah.as_ptr().add(2 * c0 + 16));
                k0 = _mm512_fmadd_ps(h0.m[1], ah, _mm512_fmadd_ps(h0.m[0], al, k0));
                k1 = _mm512_fmadd_ps(h1.m[1], ah, _mm512_fmadd_ps(h1.m[0], al, k1));
            } else {
                (l0, l1, m0, m1) = (_mm512_mul_ps(h0.w[0], da), _mm512_mul_ps(h1.w[0], da), z, z);
                let au = _mm512_maskz_loadu_ps(um, a.au.as_ptr().add(c0));
                k0 = _mm512_fmadd_ps(h0.m[0], au, k0);
                k1 = _mm512_fmadd_ps(h1.m[0], au, k1);
            }
            if n == CHUNK {
                macro_rules! pair {
                    ($p:expr, $x:ident, $y:ident) => {{
                        let u = c0 + 2 * $p;
                        let s0 = pair_sums::<U, RES>(U::codes(rows[0].data, u, mlx), a, u);
                        let s1 = pair_sums::<U, RES>(U::codes(rows[1].data, u, mlx), a, u);
                        $x = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(s0),
                            pair_scales::<U>($p, l0, m0),
                            $x,
                        );
                        $y = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(s1),
                            pair_scales::<U>($p, l1, m1),
                            $y,
                        );
                    }};
                }
                pair!(0, a0, b0);
                pair!(1, a1, b1);
                pair!(2, a0, b0);
                pair!(3, a1, b1);
                pair!(4, a0, b0);
                pair!(5, a1, b1);
                pair!(6, a0, b0);
                pair!(7, a1, b1);
            } else {
                for p in 0..n.div_ceil(2) {
                    let u = c0 + 2 * p;
                    let c = pair_codes::<U, 2>(&rows, u, c0 + n, ub, mlx, scratch);
                    a0 = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(pair_sums::<U, RES>(c[0], a, u)),
                        pair_scales::<U>(p, l0, m0),
                        a0,
                    );
                    b0 = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(pair_sums::<U, RES>(c[1], a, u)),
                        pair_scales::<U>(p, l1, m1),
                        b0,
                    );
                }
            }
            c0 += n;
        }
        [
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), k0)),
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(b0, b1), k1)),
        ]
    }
}

/// `R` rows against `T` activation rows.
#[inline(always)]
unsafe fn rows512<U: Unpack512, const RES: bool, const R: usize, const T: usize>(
    dt: DType,
    rows: [Row<'_>; R],
    units: usize,
    acts: &[ActRow<'_>; T],
    scratch: &mut Vec<u8>,
) -> [[f32; T]; R] {
    let mlx = match dt {
        DType::Mlx(q) => Some(q),
        _ => None,
    };
    let ub = unit_bytes(dt);
    // SAFETY: every intrinsic below needs only the features of `tile512`,
    // which inlines this; loads stay inside the rows and the activation
    // rows (units padded to pairs by the layout; masked loads past them).
    unsafe {
        let dup_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
        let zero = _mm512_setzero_ps();
        let mut acc = [[zero; T]; R];
        let mut acc2 = [[zero; T]; R];
        let mut corr = [[zero; T]; R];
        let mut c0 = 0;
        while c0 < units {
            let n = (units - c0).min(CHUNK);
            let ne = n.next_multiple_of(2).min(CHUNK);
            let um = ((1u32 << ne) - 1) as u16;
            let mut lo = [[zero; T]; R];
            let mut hi = [[zero; T]; R];
            for r in 0..R {
                let h = U::head(rows[r], c0, n, mlx);
                prefetch(rows[r].data.as_ptr().add(c0 * ub), n * ub);
                for t in 0..T {
                    let a = &acts[t];
                    let da = _mm512_maskz_loadu_ps(um, a.da.as_ptr().add(c0));
                    if U::PER_HALF {
                        lo[r][t] = _mm512_mul_ps(h.w[0], _mm512_permutexvar_ps(dup_lo, da));
                        hi[r][t] = _mm512_mul_ps(h.w[1], _mm512_permutexvar_ps(dup_hi, da));
                        let halves = 2 * ne;
                        let m0 = ((1u32 << halves.min(16)) - 1) as u16;
                        let m1 = ((1u32 << halves.saturating_sub(16)) - 1) as u16;
                        let al = _mm512_maskz_loadu_ps(m0, a.ah.as_ptr().add(2 * c0));
                        let ah = _mm512_maskz_loadu_ps(m1, a.ah.as_ptr().add(2 * c0 + 16));
                        corr[r][t] = _mm512_fmadd_ps(h.m[0], al, corr[r][t]);
                        corr[r][t] = _mm512_fmadd_ps(h.m[1], ah, corr[r][t]);
                    } else {
                        lo[r][t] = _mm512_mul_ps(h.w[0], da);
                        let au = _mm512_maskz_loadu_ps(um, a.au.as_ptr().add(c0));
                        corr[r][t] = _mm512_fmadd_ps(h.m[0], au, corr[r][t]);
                    }
                }
            }
            if n == CHUNK {
                // A whole chunk, unrolled: the lane indices are constants
                // and, for fewer than four tokens, two accumulators alternate.
                macro_rules! two_pairs {
                    ($p:expr) => {{
                        let p: usize = $p;
                        let (u, v) = (c0 + 2 * p, c0 + 2 * p + 2);
                        let (mut cu, mut cv) =
                            ([_mm512_setzero_si512(); R], [_mm512_setzero_si512(); R]);
                        for r in 0..R {
                            cu[r] = U::codes(rows[r].data, u, mlx);
                        }
                        acc = step_pair::<U, RES, R, T>(p, c0, cu, acts, lo, hi, acc);
                        for r in 0..R {
                            cv[r] = U::codes(rows[r].data, v, mlx);
                        }
                        // Several rows or tokens are independent chains
                        // already; one more set of accumulators would not
                        // fit the registers.
                        if T < 4 {
                            acc2 = step_pair::<U, RES, R, T>(p + 1, c0, cv, acts, lo, hi, acc2);
                        } else {
                            acc = step_pair::<U, RES, R, T>(p + 1, c0, cv, acts, lo, hi, acc);
                        }
                    }};
                }
                two_pairs!(0);
                two_pairs!(2);
                two_pairs!(4);
                two_pairs!(6);
            } else {
                for p in 0..n.div_ceil(2) {
                    let codes = pair_codes::<U, R>(&rows, c0 + 2 * p, c0 + n, ub, mlx, scratch);
                    acc = step_pair::<U, RES, R, T>(p, c0, codes, acts, lo, hi, acc);
                }
            }
            c0 += n;
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(_mm512_add_ps(
                    _mm512_add_ps(acc[r][t], acc2[r][t]),
                    corr[r][t],
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------- AVX2

/// One unit's codes as one AVX2 register.
trait Unpack256 {
    /// Codes are multiplied as signed bytes (`c - 128`, 8-bit types).
    const SIGNED: bool = false;
    /// The 32 codes of unit `u` of `row` in the order of [`super::unit_layout`]
    /// (for [`Self::SIGNED`] types, `c - 128` as bytes).
    ///
    /// # Safety
    /// AVX2 must be enabled; the unit lies in `row`.
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m256i;
}

/// `[x & 15, x >> 4]` of 16 bytes.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes at `p`; AVX2 per contract.
    unsafe {
        let q = load16(p);
        let y = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
        _mm256_and_si256(y, _mm256_set1_epi8(15))
    }
}

/// Bit `i` of `bits` as byte `i`: `v` where set, else 0.
#[inline(always)]
unsafe fn bit_bytes(bits: u32, v: i8) -> __m256i {
    // SAFETY: AVX2 per contract.
    unsafe {
        let b = _mm256_set1_epi32(bits as i32);
        let spread = _mm256_shuffle_epi8(
            b,
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
        _mm256_and_si256(on, _mm256_set1_epi8(v))
    }
}

/// `(x >> s) & mask` of the 32 bytes at `p`.
#[inline(always)]
unsafe fn fields256(p: *const u8, s: u32, mask: i8) -> __m256i {
    // SAFETY: 32 readable bytes at `p`; AVX2 per contract.
    unsafe {
        let x = _mm256_srl_epi16(load32(p), _mm_cvtsi32_si128(s as i32));
        _mm256_and_si256(x, _mm256_set1_epi8(mask))
    }
}

impl<const BB: usize, const AT: usize> Unpack256 for Q4<BB, AT> {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let b = &row[u * BB..][..BB];
        // SAFETY: 16 bytes at AT lie in the block.
        unsafe { nibbles(b[AT..].as_ptr()) }
    }
}

impl Unpack256 for Mxfp4 {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let b = &row[u * 17..][..17];
        // SAFETY: 16 bytes at 1 lie in the block; AVX2 per contract.
        unsafe {
            let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                fmt::MXFP4_CODES.as_ptr() as *const __m128i
            ));
            _mm256_shuffle_epi8(lut, nibbles(b[1..].as_ptr()))
        }
    }
}

impl<const BB: usize, const QH: usize, const AT: usize> Unpack256 for Q5<BB, QH, AT> {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m256i {
        // SAFETY: per contract.
        unsafe {
            let lo = <Q4<BB, AT> as Unpack256>::codes(row, u, q);
            _mm256_or_si256(lo, bit_bytes(u32_at(row, u * BB + QH), 16))
        }
    }
}

impl Unpack256 for Q8 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let b = &row[u * 34..][..34];
        // SAFETY: 32 bytes at 2 lie in the block.
        unsafe { load32(b[2..].as_ptr()) }
    }
}

impl Unpack256 for Q2K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let blk = &row[(u / 8) * 84..][..84];
        let su = u % 8;
        // SAFETY: the 32 bytes lie in the block.
        unsafe { fields256(blk[16 + 32 * (su / 4)..].as_ptr(), 2 * (su % 4) as u32, 3) }
    }
}

impl Unpack256 for Q3K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let blk = &row[(u / 8) * 110..][..110];
        let su = u % 8;
        let (n, j) = (su / 4, su % 4);
        // SAFETY: both 32-byte ranges lie in the block.
        unsafe {
            let q = fields256(blk[32 + 32 * n..].as_ptr(), 2 * j as u32, 3);
            let h = fields256(blk.as_ptr(), (4 * n + j) as u32, 1);
            _mm256_or_si256(q, _mm256_slli_epi16(h, 2))
        }
    }
}

impl Unpack256 for Q4K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let blk = &row[(u / 8) * 144..][..144];
        let su = u % 8;
        // SAFETY: the 32 bytes lie in the block.
        unsafe { fields256(blk[16 + 32 * (su / 2)..].as_ptr(), 4 * (su % 2) as u32, 15) }
    }
}

impl Unpack256 for Q5K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let blk = &row[(u / 8) * 176..][..176];
        let su = u % 8;
        // SAFETY: both 32-byte ranges lie in the block.
        unsafe {
            let q = fields256(blk[48 + 32 * (su / 2)..].as_ptr(), 4 * (su % 2) as u32, 15);
            let h = fields256(blk[16..].as_ptr(), su as u32, 1);
            _mm256_or_si256(q, _mm256_slli_epi16(h, 4))
        }
    }
}

impl Unpack256 for Q6K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> __m256i {
        let blk = &row[(u / 8) * 210..][..210];
        let su = u % 8;
        let (n, k) = (su / 4, su % 4);
        // SAFETY: both 32-byte ranges lie in the block.
        unsafe {
            let lo = fields256(
                blk[64 * n + 32 * (k % 2)..].as_ptr(),
                4 * (k / 2) as u32,
                15,
            );
            let h = fields256(blk[128 + 32 * n..].as_ptr(), 2 * k as u32, 3);
            _mm256_or_si256(lo, _mm256_slli_epi16(h, 4))
        }
    }
}

/// MLX on AVX2: 4- and 2-bit fields by shifts (their layouts permute the
/// activations), 8-bit as signed bytes, 3/5/6-bit through the reference
/// unpacking (AVX2 has no per-byte variable shifts).
struct Mlx256<const BITS: u8>;
impl<const BITS: u8> Unpack256 for Mlx256<BITS> {
    const SIGNED: bool = BITS == 8;
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> __m256i {
        let src = &row[u * 4 * BITS as usize..][..4 * BITS as usize];
        // SAFETY: the loads read inside `src` (16, 8 or 32 bytes for 4, 2
        // and 8 bits); AVX2 per contract.
        unsafe {
            match BITS {
                4 => nibbles(src.as_ptr()),
                2 => {
                    let x = _mm256_set1_epi64x(i64::from_le_bytes(src[..8].try_into().unwrap()));
                    let s = _mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 2, 4, 6));
                    _mm256_and_si256(s, _mm256_set1_epi8(3))
                }
                8 => _mm256_xor_si256(load32(src.as_ptr()), _mm256_set1_epi8(-128)),
                _ => {
                    let mut c = [0u8; 32];
                    fmt::codes(
                        DType::Mlx(q.expect("MLX quantization")),
                        Row {
                            data: row,
                            scales: &[],
                            biases: &[],
                        },
                        u,
                        &mut c,
                    );
                    load32(c.as_ptr())
                }
            }
        }
    }
}

/// Rows `r0..r1` of a quantized `w` against `act`, AVX2.
///
/// # Safety
/// The CPU must support [`super::Isa::Avx2`]; `act` was made with
/// [`super::unit_layout`]; `out` rows `r0..r1` belong to the caller.
pub unsafe fn avx2_q8_tile(w: &WeightView<'_>, r0: usize, r1: usize, act: &QAct, out: Out) {
    // SAFETY: forwarded contract.
    unsafe {
        if act.residual {
            avx2_dispatch::<true>(w, r0, r1, act, out)
        } else {
            avx2_dispatch::<false>(w, r0, r1, act, out)
        }
    }
}

/// [`avx2_q8_tile`] with the residual plane (`RES`) or without.
unsafe fn avx2_dispatch<const RES: bool>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    act: &QAct,
    out: Out,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match w.dtype {
            DType::Q4_0 => tile256::<Q4<18, 2>, RES>(w, r0, r1, act, out),
            DType::Q4_1 => tile256::<Q4<20, 4>, RES>(w, r0, r1, act, out),
            DType::Q5_0 => tile256::<Q5<22, 2, 6>, RES>(w, r0, r1, act, out),
            DType::Q5_1 => tile256::<Q5<24, 4, 8>, RES>(w, r0, r1, act, out),
            DType::Q8_0 => tile256::<Q8, RES>(w, r0, r1, act, out),
            DType::Q2_K => tile256::<Q2K, RES>(w, r0, r1, act, out),
            DType::Q3_K => tile256::<Q3K, RES>(w, r0, r1, act, out),
            DType::Q4_K => tile256::<Q4K, RES>(w, r0, r1, act, out),
            DType::Q5_K => tile256::<Q5K, RES>(w, r0, r1, act, out),
            DType::Q6_K => tile256::<Q6K, RES>(w, r0, r1, act, out),
            DType::Mlx(q) => match q.bits {
                2 => tile256::<Mlx256<2>, RES>(w, r0, r1, act, out),
                3 => tile256::<Mlx256<3>, RES>(w, r0, r1, act, out),
                4 => tile256::<Mlx256<4>, RES>(w, r0, r1, act, out),
                5 => tile256::<Mlx256<5>, RES>(w, r0, r1, act, out),
                6 => tile256::<Mlx256<6>, RES>(w, r0, r1, act, out),
                _ => tile256::<Mlx256<8>, RES>(w, r0, r1, act, out),
            },
            DType::MXFP4 => tile256::<Mxfp4, RES>(w, r0, r1, act, out),
            DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => {
                unreachable!("float and FP8 weights take the f32 path")
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<U: Unpack256, const RES: bool>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    act: &QAct,
    out: Out,
) {
    let units = w.cols / UNIT;
    let rows = Rows::new(w);
    for r in r0..r1 {
        let row = rows.row(r);
        let mut t0 = 0;
        while t0 < act.n {
            let nt = (act.n - t0).min(TOK);
            let s = match nt {
                // SAFETY: features enabled here; shapes checked by dispatch.
                4 => unsafe { row256::<U, RES, 4>(w.dtype, row, units, act, t0) },
                _ => {
                    let mut s = [0f32; TOK];
                    for i in 0..nt {
                        // SAFETY: as above.
                        s[i] = unsafe { row256::<U, RES, 1>(w.dtype, row, units, act, t0 + i)[0] };
                    }
                    s
                }
            };
            for (i, v) in s.iter().take(nt).enumerate() {
                // SAFETY: the caller owns rows r0..r1 of `out`.
                unsafe { out.put(t0 + i, r, *v) };
            }
            t0 += nt;
        }
    }
}

#[inline(always)]
unsafe fn row256<U: Unpack256, const RES: bool, const T: usize>(
    dt: DType,
    row: Row<'_>,
    units: usize,
    act: &QAct,
    t0: usize,
) -> [f32; TOK] {
    let mlx = match dt {
        DType::Mlx(q) => Some(q),
        _ => None,
    };
    let s8 = if U::SIGNED { Signed8::Yes } else { Signed8::No };
    let acts: [ActRow<'_>; T] = std::array::from_fn(|i| act.row(t0 + i));
    let ub = unit_bytes(dt);
    // SAFETY: only AVX2/FMA intrinsics (enabled by `tile256`, which inlines
    // this); loads stay inside the row and the activation rows.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut corr = [_mm256_setzero_ps(); T];
        let (mut wt, mut mt) = ([0f32; 2 * CHUNK], [0f32; 2 * CHUNK]);
        let mut lt = [[0f32; 2 * CHUNK]; T];
        let mut c0 = 0;
        while c0 < units {
            let n = (units - c0).min(CHUNK);
            fmt::header(dt, row, c0, n, s8, &mut wt, &mut mt);
            prefetch(row.data.as_ptr().add(c0 * ub), n * ub);
            for t in 0..T {
                let a = &acts[t];
                for i in 0..2 * n {
                    lt[t][i] = wt[i] * a.da[c0 + i / 2];
                }
                let mut k = 0;
                while k + 8 <= 2 * n {
                    let m = _mm256_loadu_ps(mt.as_ptr().add(k));
                    let h = _mm256_loadu_ps(a.ah.as_ptr().add(2 * c0 + k));
                    corr[t] = _mm256_fmadd_ps(m, h, corr[t]);
                    k += 8;
                }
                // Fewer than four units left: their pairs one by one.
                while k < 2 * n {
                    let m = _mm256_castps128_ps256(_mm_set_ss(mt[k]));
                    let h = _mm256_castps128_ps256(_mm_set_ss(a.ah[2 * c0 + k]));
                    corr[t] = _mm256_fmadd_ps(m, h, corr[t]);
                    k += 1;
                }
            }
            for i in 0..n {
                let u = c0 + i;
                let codes = U::codes(row.data, u, mlx);
                let mag = if U::SIGNED {
                    _mm256_sign_epi8(codes, codes)
                } else {
                    codes
                };
                for t in 0..T {
                    let a = load32(acts[t].qs.as_ptr().add(u * UNIT) as *const u8);
                    let a = if U::SIGNED {
                        _mm256_sign_epi8(a, codes)
                    } else {
                        a
                    };
                    let mut s = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, a), ones);
                    if RES {
                        let b = load32(acts[t].res.as_ptr().add(u * UNIT) as *const u8);
                        let b = if U::SIGNED {
                            _mm256_sign_epi8(b, codes)
                        } else {
                            b
                        };
                        let r = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, b), ones);
                        s = _mm256_add_epi32(_mm256_slli_epi32(s, 8), r);
                    }
                    let pair = _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(
                        lt[t].as_ptr().add(2 * i) as *const f64,
                    )));
                    let l = _mm256_permutevar8x32_ps(pair, halves);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), l, acc[t]);
                }
            }
            c0 += n;
        }
        let mut r = [0f32; TOK];
        for t in 0..T {
            r[t] = hsum256(acc[t]) + hsum256(corr[t]);
        }
        r
    }
}

// ---------------------------------------------------------------- activations

/// One unit of activations quantized (see `act.rs`): the same rounding as
/// the portable code (`vcvtps2dq` rounds to nearest even), so the same
/// bytes.
///
/// # Safety
/// AVX2 and FMA must be available; `x` holds 32 values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_unit(
    x: &[f32],
    q: &mut [i8; 32],
    r: Option<&mut [i8; 32]>,
) -> (f32, [i32; 2]) {
    assert!(x.len() >= 32);
    // SAFETY: 32 floats read, 32 bytes written per plane.
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let clamp = |y: __m256| _mm256_min_ps(_mm256_max_ps(y, lo), hi);
        let mut a = [_mm256_setzero_si256(); 4];
        let mut b = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            let t = _mm256_mul_ps(v[k], id);
            let ar = clamp(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(t));
            a[k] = _mm256_cvttps_epi32(ar);
            let rr = _mm256_mul_ps(_mm256_sub_ps(t, ar), _mm256_set1_ps(256.0));
            b[k] = _mm256_cvttps_epi32(clamp(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(rr)));
        }
        let bytes = |w: &[__m256i; 4]| {
            let p = _mm256_packs_epi16(
                _mm256_packs_epi32(w[0], w[1]),
                _mm256_packs_epi32(w[2], w[3]),
            );
            _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        };
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes(&a));
        let hsum = |p: __m256i, q: __m256i| {
            let s = _mm256_add_epi32(p, q);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
        };
        let mut h = [hsum(a[0], a[1]), hsum(a[2], a[3])];
        if let Some(r) = r {
            _mm256_storeu_si256(r.as_mut_ptr() as *mut __m256i, bytes(&b));
            h = [256 * h[0] + hsum(b[0], b[1]), 256 * h[1] + hsum(b[2], b[3])];
        }
        (d, h)
    }
}

/// `out[k] = nat[perm[k]]` for a 64-byte step, one `vpermb`.
///
/// # Safety
/// AVX-512 VBMI must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub unsafe fn permute64(out: &mut [i8], nat: &[i8], perm: &[u8]) {
    assert!(out.len() == 64 && nat.len() == 64 && perm.len() == 64);
    // SAFETY: 64 bytes of each slice (checked).
    unsafe {
        let idx = _mm512_loadu_si512(perm.as_ptr() as *const _);
        let v = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512(nat.as_ptr() as *const _));
        _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v);
    }
}

// ---------------------------------------------------------------- float weights

/// F32, F16 or BF16 weights as 16 floats (`K` = 0, 1, 2), lanes past
/// `len` zero.
#[inline(always)]
unsafe fn floats16<const K: u8>(p: *const u8, len: usize) -> __m512 {
    let m = if len >= 16 {
        u16::MAX
    } else {
        ((1u32 << len) - 1) as u16
    };
    // SAFETY: masked loads read `len` values at `p`; AVX-512F/BW per
    // contract.
    unsafe {
        match K {
            0 => _mm512_maskz_loadu_ps(m, p as *const f32),
            1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p as *const i16)),
                16,
            )),
        }
    }
}

/// Rows `r0..r1` of F32/F16/BF16 `w` against `n` rows of `x`, AVX-512:
/// converted in registers, fused multiply-adds, four tokens per pass.
///
/// # Safety
/// The CPU must support [`super::Isa::Avx512`]; `out` rows `r0..r1`
/// belong to the caller.
pub unsafe fn avx512_float_tile(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: Out,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match w.dtype {
            DType::F32 => float512::<0>(w, r0, r1, x, n, out),
            DType::F16 => float512::<1>(w, r0, r1, x, n, out),
            _ => float512::<2>(w, r0, r1, x, n, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn float512<const K: u8>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: Out,
) {
    let cols = w.cols;
    assert!(x.len() >= n * cols);
    let rows = Rows::new(w);
    let eb = if K == 0 { 4 } else { 2 };
    let sums = |r: usize, t0: usize, nt: usize| {
        let row = rows.row(r).data;
        assert!(row.len() >= cols * eb);
        let mut acc = [[_mm512_setzero_ps(); TOK]; 2];
        let mut c = 0;
        while c < cols {
            let len = (cols - c).min(16);
            // `floats16` masks the tail.
            // SAFETY: loads stay in the row and in activation rows t0..t0 + nt.
            unsafe {
                let p = row.as_ptr().add(c * eb);
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD) as *const i8);
                let wv = floats16::<K>(p, len);
                let m = if len >= 16 {
                    u16::MAX
                } else {
                    ((1u32 << len) - 1) as u16
                };
                let a = &mut acc[(c / 16) % 2];
                for t in 0..nt {
                    let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add((t0 + t) * cols + c));
                    a[t] = _mm512_fmadd_ps(wv, xv, a[t]);
                }
            }
            c += 16;
        }
        acc
    };
    // SAFETY: the caller owns rows r0..r1 of `out`.
    unsafe { float_rows(rows.row_bytes(), r0, r1, n, out, sums) }
}

/// The loops of the f32-path kernels: rows `r0..r1` in blocks that stay
/// in L2 (rows of `row_bytes`), tokens in tiles of [`TOK`]; `row(r, t0,
/// nt)` returns row `r`'s two partial sums for tokens `t0..t0 + nt`,
/// whose totals go to `out`.
///
/// # Safety
/// AVX-512F must be enabled; `out` rows `r0..r1` belong to the caller.
#[inline(always)]
unsafe fn float_rows(
    row_bytes: usize,
    r0: usize,
    r1: usize,
    n: usize,
    out: Out,
    mut row: impl FnMut(usize, usize, usize) -> [[__m512; TOK]; 2],
) {
    let rb = (ROW_BLOCK_BYTES / row_bytes.max(1)).max(1);
    for b0 in (r0..r1).step_by(rb) {
        let b1 = (b0 + rb).min(r1);
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(TOK);
            for r in b0..b1 {
                let acc = row(r, t0, nt);
                for t in 0..nt {
                    // SAFETY: the caller owns row r; AVX-512F per contract.
                    unsafe {
                        let s = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]));
                        out.put(t0 + t, r, s);
                    }
                }
            }
            t0 += nt;
        }
    }
}

// ---------------------------------------------------------------- FP8

/// 32 E4M3 codes at `p` (lanes past `len` zero) as two vectors of 16
/// floats, each the code's value times 2⁻⁸: the code widened to the IEEE
/// half with the same bits (NaN codes given an all-ones exponent), then
/// converted.
#[inline(always)]
unsafe fn fp8x32(p: *const u8, len: usize) -> (__m512, __m512) {
    let m = if len >= 32 {
        u32::MAX
    } else {
        ((1u64 << len) - 1) as u32
    };
    // SAFETY: the masked load reads `len` bytes at `p`; features per contract.
    unsafe {
        let w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, p as *const i8));
        let mag = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x7f)), 7);
        let sign = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8);
        let nan = _mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(0x3f80));
        let h = _mm512_or_si512(mag, sign);
        let h = _mm512_mask_mov_epi16(h, nan, _mm512_or_si512(h, _mm512_set1_epi16(0x7c00)));
        (
            _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
        )
    }
}

/// Rows `r0..r1` of block-scaled FP8 `w` (tiles a multiple of 16 columns
/// wide) against `n` rows of `x`, AVX-512: each weight its code's value
/// times its tile's scale, as `sluice_core::fp8` computes it (the code's
/// half is the value times 2⁻⁸ and 256 · scale is exact, so one product
/// rounds as the table's does), dotted by fused multiply-adds, four tokens
/// per pass.
///
/// # Safety
/// The CPU must support [`super::Isa::Avx512`]; `out` rows `r0..r1`
/// belong to the caller.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
pub unsafe fn avx512_fp8_tile(
    w: &WeightView<'_>,
    q: sluice_core::Fp8Block,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: Out,
) {
    let cols = w.cols;
    let bc = q.block_cols as usize;
    assert!(x.len() >= n * cols && bc.is_multiple_of(16));
    let rows = Rows::new(w);
    let mut sc = Vec::with_capacity(q.scale_cols(cols));
    let sums = |r: usize, t0: usize, nt: usize| {
        let row = rows.row(r);
        assert!(row.data.len() >= cols);
        sc.clear();
        sluice_core::fp8::line_f32(q, row.scales, &mut sc);
        assert!(sc.len() >= cols.div_ceil(bc));
        let mut acc = [[_mm512_setzero_ps(); TOK]; 2];
        // Tile by tile, its scale broadcast once.
        for (j, &s) in sc.iter().enumerate().take(cols.div_ceil(bc)) {
            // 256 · s is exact unless it overflows: then the two
            // factors go one at a time.
            let s256 = s * 256.0;
            let finite = s256.is_finite();
            let (s, two8) = if finite {
                (_mm512_set1_ps(s256), _mm512_set1_ps(1.0))
            } else {
                (_mm512_set1_ps(s), _mm512_set1_ps(256.0))
            };
            let end = ((j + 1) * bc).min(cols);
            let mut c = j * bc;
            while c < end {
                let len = (end - c).min(32);
                // `fp8x32` and the activation loads mask the tail.
                // SAFETY: loads stay in the row and in activation rows t0..t0 + nt.
                unsafe {
                    let p = row.data.as_ptr().add(c);
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD) as *const i8);
                    let (lo, hi) = fp8x32(p, len);
                    let (lo, hi) = if finite {
                        (_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s))
                    } else {
                        (
                            _mm512_mul_ps(_mm512_mul_ps(lo, two8), s),
                            _mm512_mul_ps(_mm512_mul_ps(hi, two8), s),
                        )
                    };
                    let m = if len >= 32 {
                        u32::MAX
                    } else {
                        ((1u64 << len) - 1) as u32
                    };
                    let (ml, mh) = (m as u16, (m >> 16) as u16);
                    for t in 0..nt {
                        let xp = x.as_ptr().add((t0 + t) * cols + c);
                        let xl = _mm512_maskz_loadu_ps(ml, xp);
                        let xh = _mm512_maskz_loadu_ps(mh, xp.wrapping_add(16));
                        acc[0][t] = _mm512_fmadd_ps(lo, xl, acc[0][t]);
                        acc[1][t] = _mm512_fmadd_ps(hi, xh, acc[1][t]);
                    }
                }
                c += 32;
            }
        }
        acc
    };
    // SAFETY: the caller owns rows r0..r1 of `out`.
    unsafe { float_rows(rows.row_bytes(), r0, r1, n, out, sums) }
}

// ---------------------------------------------------------------- f32

/// `Σ a[i]·b[i]` with FMA, four partial sums of eight.
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads `i..i + 8 <= n` of both slices.
    unsafe {
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * k));
                let y = _mm256_loadu_ps(pb.add(i + 8 * k));
                *a = _mm256_fmadd_ps(x, y, *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut r = hsum256(s);
        while i < n {
            r += a[i] * b[i];
            i += 1;
        }
        r
    }
}
