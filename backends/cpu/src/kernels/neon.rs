//! aarch64 kernels: NEON, with the dot-product instructions where present
//! (Apple M1/A13 and later, Neoverse, Cortex-A76 and later).
//!
//! The structure is AVX2's (`x86.rs`): one unit per step, its 32 codes as
//! two 16-byte registers (the unit's halves), multiplied as signed bytes
//! (8-bit codes as `c - 128`, [`Signed8::Yes`]) with `sdot` or, without it,
//! `smull` and pairwise widening adds; each half's four 32-bit sums are
//! converted and scaled by the half's `W·da`. Rust does not expose `sdot`
//! yet (`stdarch_neon_dotprod` is unstable), so it is one instruction of
//! inline assembly in a function compiled with the `dotprod` feature.
//!
//! Not measured here (the development machine is x86-64): correctness is
//! tested under qemu-user, speed is not.

// Kernels index parallel arrays (tokens of registers) by position.
#![allow(clippy::needless_range_loop)]

use super::fmt::{self, Row, Signed8, CHUNK, UNIT};
use super::{Out, Rows};
use crate::act::{ActRow, QAct};
use sluice_core::{DType, MlxQuant, WeightView};
use std::arch::aarch64::*;
use std::arch::asm;

/// Token rows one pass over a weight row serves.
const TOK: usize = 4;

/// `acc + Σ a·b` per group of four bytes.
#[inline(always)]
unsafe fn dot16<const DOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if DOT {
        let mut r = acc;
        // SAFETY: `sdot` reads and writes registers only; the caller is
        // compiled with the dotprod feature (checked at run time).
        unsafe {
            asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) r, in(vreg) a, in(vreg) b,
                 options(pure, nomem, nostack, preserves_flags));
        }
        r
    } else {
        // SAFETY: NEON is part of aarch64.
        unsafe {
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// One unit's codes as two registers (the halves, or the layout's order).
trait UnpackNeon {
    /// 8-bit codes, read as `c - 128`.
    const SIGNED: bool = false;
    /// The 32 codes of unit `u` of `row`, in the order of `avx2_layout`
    /// (which NEON shares).
    ///
    /// # Safety
    /// The unit lies in `row`.
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> (int8x16_t, int8x16_t);
}

#[inline(always)]
unsafe fn ld(p: &[u8]) -> uint8x16_t {
    assert!(p.len() >= 16);
    // SAFETY: 16 bytes of `p` (checked).
    unsafe { vld1q_u8(p.as_ptr()) }
}

/// `(x >> s) & m` per byte.
#[inline(always)]
unsafe fn field(x: uint8x16_t, s: u32, m: u8) -> uint8x16_t {
    // SAFETY: NEON is part of aarch64.
    unsafe { vandq_u8(vshlq_u8(x, vdupq_n_s8(-(s as i8))), vdupq_n_u8(m)) }
}

#[inline(always)]
unsafe fn s8(x: uint8x16_t) -> int8x16_t {
    // SAFETY: a reinterpretation.
    unsafe { vreinterpretq_s8_u8(x) }
}

/// Bits 0..16 of `bits` as 16 bytes: `v` where set, else 0.
#[inline(always)]
unsafe fn bit_bytes(bits: u32, v: u8) -> uint8x16_t {
    // SAFETY: NEON is part of aarch64.
    unsafe {
        let b = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        let sel = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
        vandq_u8(vtstq_u8(b, sel), vdupq_n_u8(v))
    }
}

#[inline(always)]
fn u32_at(p: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]])
}

struct Q4<const BB: usize, const AT: usize>;
impl<const BB: usize, const AT: usize> UnpackNeon for Q4<BB, AT> {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let b = &row[u * BB..][..BB];
        // SAFETY: 16 bytes at AT lie in the block.
        unsafe {
            let q = ld(&b[AT..]);
            (s8(vandq_u8(q, vdupq_n_u8(15))), s8(vshrq_n_u8(q, 4)))
        }
    }
}

/// MXFP4: Q4_0's nibbles in 17-byte blocks, each looked up to its code
/// (`fmt::MXFP4_CODES`).
struct Mxfp4;
impl UnpackNeon for Mxfp4 {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let b = &row[u * 17..][..17];
        // SAFETY: 16 bytes at 1 lie in the block; the table has 16.
        unsafe {
            let q = ld(&b[1..]);
            let lut = ld(&fmt::MXFP4_CODES);
            (
                s8(vqtbl1q_u8(lut, vandq_u8(q, vdupq_n_u8(15)))),
                s8(vqtbl1q_u8(lut, vshrq_n_u8(q, 4))),
            )
        }
    }
}

struct Q5<const BB: usize, const QH: usize, const AT: usize>;
impl<const BB: usize, const QH: usize, const AT: usize> UnpackNeon for Q5<BB, QH, AT> {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        // SAFETY: per contract.
        unsafe {
            let (lo, hi) = <Q4<BB, AT> as UnpackNeon>::codes(row, u, q);
            let h = u32_at(row, u * BB + QH);
            (
                vorrq_s8(lo, s8(bit_bytes(h, 16))),
                vorrq_s8(hi, s8(bit_bytes(h >> 16, 16))),
            )
        }
    }
}

struct Q8;
impl UnpackNeon for Q8 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let b = &row[u * 34..][..34];
        // SAFETY: 32 bytes at 2 lie in the block.
        unsafe { (s8(ld(&b[2..])), s8(ld(&b[18..]))) }
    }
}

struct Q2K;
impl UnpackNeon for Q2K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let blk = &row[(u / 8) * 84..][..84];
        let su = u % 8;
        let (q, s) = (&blk[16 + 32 * (su / 4)..], 2 * (su % 4) as u32);
        // SAFETY: 32 bytes lie in the block.
        unsafe { (s8(field(ld(q), s, 3)), s8(field(ld(&q[16..]), s, 3))) }
    }
}

struct Q3K;
impl UnpackNeon for Q3K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let blk = &row[(u / 8) * 110..][..110];
        let su = u % 8;
        let (n, j) = (su / 4, su % 4);
        let q = &blk[32 + 32 * n..];
        let bit = (4 * n + j) as u32;
        // SAFETY: both 32-byte ranges lie in the block.
        unsafe {
            let f = |o: usize| {
                let c = field(ld(&q[o..]), 2 * j as u32, 3);
                let h = vshlq_n_u8(field(ld(&blk[o..]), bit, 1), 2);
                s8(vorrq_u8(c, h))
            };
            (f(0), f(16))
        }
    }
}

struct Q45K<const K5: bool>;
impl<const K5: bool> UnpackNeon for Q45K<K5> {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let bb = if K5 { 176 } else { 144 };
        let blk = &row[(u / 8) * bb..][..bb];
        let su = u % 8;
        let q = &blk[if K5 { 48 } else { 16 } + 32 * (su / 2)..];
        let s = 4 * (su % 2) as u32;
        // SAFETY: the 32-byte ranges lie in the block.
        unsafe {
            let f = |o: usize| {
                let c = field(ld(&q[o..]), s, 15);
                if K5 {
                    s8(vorrq_u8(
                        c,
                        vshlq_n_u8(field(ld(&blk[16 + o..]), su as u32, 1), 4),
                    ))
                } else {
                    s8(c)
                }
            };
            (f(0), f(16))
        }
    }
}

struct Q6K;
impl UnpackNeon for Q6K {
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, _: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let blk = &row[(u / 8) * 210..][..210];
        let su = u % 8;
        let (n, k) = (su / 4, su % 4);
        let ql = &blk[64 * n + 32 * (k % 2)..];
        let qh = &blk[128 + 32 * n..];
        // SAFETY: the 32-byte ranges lie in the block.
        unsafe {
            let f = |o: usize| {
                let c = field(ld(&ql[o..]), 4 * (k / 2) as u32, 15);
                s8(vorrq_u8(
                    c,
                    vshlq_n_u8(field(ld(&qh[o..]), 2 * k as u32, 3), 4),
                ))
            };
            (f(0), f(16))
        }
    }
}

/// MLX: 4-bit as [even values, odd values], 2-bit as its four fields, 8-bit
/// as signed bytes, 3/5/6-bit through the reference unpacking (the orders
/// of `avx2_layout`).
struct Mlx<const BITS: u8>;
impl<const BITS: u8> UnpackNeon for Mlx<BITS> {
    const SIGNED: bool = BITS == 8;
    #[inline(always)]
    unsafe fn codes(row: &[u8], u: usize, q: Option<MlxQuant>) -> (int8x16_t, int8x16_t) {
        let src = &row[u * 4 * BITS as usize..][..4 * BITS as usize];
        // SAFETY: loads stay inside `src` (16 or 32 bytes), or a local
        // buffer.
        unsafe {
            match BITS {
                4 => {
                    let x = ld(src);
                    (s8(vandq_u8(x, vdupq_n_u8(15))), s8(vshrq_n_u8(x, 4)))
                }
                2 => {
                    let x = vld1_u8(src.as_ptr());
                    let x = vcombine_u8(x, x);
                    let a = vandq_u8(
                        vshlq_u8(x, vcombine_s8(vdup_n_s8(0), vdup_n_s8(-2))),
                        vdupq_n_u8(3),
                    );
                    let b = vandq_u8(
                        vshlq_u8(x, vcombine_s8(vdup_n_s8(-4), vdup_n_s8(-6))),
                        vdupq_n_u8(3),
                    );
                    (s8(a), s8(b))
                }
                8 => {
                    let m = vdupq_n_u8(0x80);
                    (s8(veorq_u8(ld(src), m)), s8(veorq_u8(ld(&src[16..]), m)))
                }
                _ => {
                    let mut c = [0u8; 32];
                    let row = Row {
                        data: row,
                        scales: &[],
                        biases: &[],
                    };
                    fmt::codes(DType::Mlx(q.expect("MLX quantization")), row, u, &mut c);
                    (s8(ld(&c)), s8(ld(&c[16..])))
                }
            }
        }
    }
}

/// Rows `r0..r1` of a quantized `w` against `act` (made with the AVX2
/// layout), NEON with (`dot`) or without the dot-product instructions.
///
/// # Safety
/// With `dot`, the CPU must have the dot-product instructions; `out` rows
/// `r0..r1` belong to the caller.
pub unsafe fn q8_tile(dot: bool, w: &WeightView<'_>, r0: usize, r1: usize, act: &QAct, out: Out) {
    // SAFETY: forwarded contract.
    unsafe {
        match (dot, act.residual) {
            (true, true) => dispatch_dot::<true>(w, r0, r1, act, out),
            (true, false) => dispatch_dot::<false>(w, r0, r1, act, out),
            (false, true) => dispatch::<false, true>(w, r0, r1, act, out),
            (false, false) => dispatch::<false, false>(w, r0, r1, act, out),
        }
    }
}

/// [`dispatch`] compiled with the dot-product feature.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dispatch_dot<const RES: bool>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    act: &QAct,
    out: Out,
) {
    // SAFETY: forwarded contract; the feature is enabled here.
    unsafe { dispatch::<true, RES>(w, r0, r1, act, out) }
}

#[inline(always)]
unsafe fn dispatch<const DOT: bool, const RES: bool>(
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    act: &QAct,
    out: Out,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match w.dtype {
            DType::Q4_0 => tile::<Q4<18, 2>, DOT, RES>(w, r0, r1, act, out),
            DType::Q4_1 => tile::<Q4<20, 4>, DOT, RES>(w, r0, r1, act, out),
            DType::Q5_0 => tile::<Q5<22, 2, 6>, DOT, RES>(w, r0, r1, act, out),
            DType::Q5_1 => tile::<Q5<24, 4, 8>, DOT, RES>(w, r0, r1, act, out),
            DType::Q8_0 => tile::<Q8, DOT, RES>(w, r0, r1, act, out),
            DType::Q2_K => tile::<Q2K, DOT, RES>(w, r0, r1, act, out),
            DType::Q3_K => tile::<Q3K, DOT, RES>(w, r0, r1, act, out),
            DType::Q4_K => tile::<Q45K<false>, DOT, RES>(w, r0, r1, act, out),
            DType::Q5_K => tile::<Q45K<true>, DOT, RES>(w, r0, r1, act, out),
            DType::Q6_K => tile::<Q6K, DOT, RES>(w, r0, r1, act, out),
            DType::Mlx(q) => match q.bits {
                2 => tile::<Mlx<2>, DOT, RES>(w, r0, r1, act, out),
                3 => tile::<Mlx<3>, DOT, RES>(w, r0, r1, act, out),
                4 => tile::<Mlx<4>, DOT, RES>(w, r0, r1, act, out),
                5 => tile::<Mlx<5>, DOT, RES>(w, r0, r1, act, out),
                6 => tile::<Mlx<6>, DOT, RES>(w, r0, r1, act, out),
                _ => tile::<Mlx<8>, DOT, RES>(w, r0, r1, act, out),
            },
            DType::MXFP4 => tile::<Mxfp4, DOT, RES>(w, r0, r1, act, out),
            DType::F32 | DType::F16 | DType::BF16 | DType::FP8(_) => {
                unreachable!("float and FP8 weights take the f32 path")
            }
        }
    }
}

#[inline(always)]
unsafe fn tile<U: UnpackNeon, const DOT: bool, const RES: bool>(
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
            if act.n - t0 >= TOK {
                let acts: [ActRow<'_>; TOK] = std::array::from_fn(|i| act.row(t0 + i));
                // SAFETY: shapes checked by the dispatch.
                let s = unsafe { row_dot::<U, DOT, RES, TOK>(w.dtype, row, units, &acts) };
                for (i, v) in s.iter().enumerate() {
                    // SAFETY: the caller owns rows r0..r1 of `out`.
                    unsafe { out.put(t0 + i, r, *v) };
                }
                t0 += TOK;
            } else {
                // SAFETY: as above.
                let s = unsafe { row_dot::<U, DOT, RES, 1>(w.dtype, row, units, &[act.row(t0)]) };
                // SAFETY: the caller owns rows r0..r1 of `out`.
                unsafe { out.put(t0, r, s[0]) };
                t0 += 1;
            }
        }
    }
}

/// One row against `T` activation rows.
#[inline(always)]
unsafe fn row_dot<U: UnpackNeon, const DOT: bool, const RES: bool, const T: usize>(
    dt: DType,
    row: Row<'_>,
    units: usize,
    acts: &[ActRow<'_>; T],
) -> [f32; T] {
    let mlx = match dt {
        DType::Mlx(q) => Some(q),
        _ => None,
    };
    let s8m = if U::SIGNED { Signed8::Yes } else { Signed8::No };
    // SAFETY: NEON is part of aarch64 (and `sdot`'s feature is the
    // caller's); loads stay inside the row and the activation rows.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); T];
        let mut corr = [0f32; T];
        let (mut wt, mut mt) = ([0f32; 2 * CHUNK], [0f32; 2 * CHUNK]);
        let mut c0 = 0;
        while c0 < units {
            let n = (units - c0).min(CHUNK);
            fmt::header(dt, row, c0, n, s8m, &mut wt, &mut mt);
            for t in 0..T {
                for k in 0..2 * n {
                    corr[t] += mt[k] * acts[t].ah[2 * c0 + k];
                }
            }
            for i in 0..n {
                let u = c0 + i;
                let (lo, hi) = U::codes(row.data, u, mlx);
                for t in 0..T {
                    let a = &acts[t];
                    let q = a.qs.as_ptr().add(u * UNIT);
                    let z = vdupq_n_s32(0);
                    let mut s0 = dot16::<DOT>(z, lo, vld1q_s8(q));
                    let mut s1 = dot16::<DOT>(z, hi, vld1q_s8(q.add(16)));
                    if RES {
                        let r = a.res.as_ptr().add(u * UNIT);
                        s0 = dot16::<DOT>(vshlq_n_s32(s0, 8), lo, vld1q_s8(r));
                        s1 = dot16::<DOT>(vshlq_n_s32(s1, 8), hi, vld1q_s8(r.add(16)));
                    }
                    let da = a.da[u];
                    acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(s0), wt[2 * i] * da);
                    acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(s1), wt[2 * i + 1] * da);
                }
            }
            c0 += n;
        }
        let mut r = [0f32; T];
        for t in 0..T {
            r[t] = vaddvq_f32(acc[t]) + corr[t];
        }
        r
    }
}

/// `Σ a[i]·b[i]` with four partial sums of four.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    // SAFETY: NEON is part of aarch64; loads read `i..i + 4 <= n`.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                *s = vfmaq_f32(
                    *s,
                    vld1q_f32(a.as_ptr().add(i + 4 * k)),
                    vld1q_f32(b.as_ptr().add(i + 4 * k)),
                );
            }
            i += 16;
        }
        let mut r = vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
        while i < n {
            r += a[i] * b[i];
            i += 1;
        }
        r
    }
}
