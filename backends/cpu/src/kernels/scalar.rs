//! The portable kernels: the reference every SIMD module is tested
//! against, and the fallback where no SIMD module applies.

use super::fmt::{self, Row, Signed8, CHUNK, UNIT};
use super::{Out, Rows};
use crate::act::{ActRow, QAct};
use sluice_core::{DType, WeightView};

/// Tokens whose sums one pass over a row keeps.
const TOK: usize = 8;

/// Rows `r0..r1` of `w` against every row of `act` (8-bit activations).
pub fn q8_tile(w: &WeightView<'_>, r0: usize, r1: usize, act: &QAct, out: Out) {
    let units = w.cols / UNIT;
    let rows = Rows::new(w);
    for r in r0..r1 {
        let row = rows.row(r);
        for t0 in (0..act.n).step_by(TOK) {
            let nt = (act.n - t0).min(TOK);
            let rows: Vec<ActRow<'_>> = (t0..t0 + nt).map(|t| act.row(t)).collect();
            let s = row_dot(w.dtype, row, units, &rows);
            for (i, v) in s.iter().take(nt).enumerate() {
                // SAFETY: the caller owns rows r0..r1 of `out` (see `Out`).
                unsafe { out.put(t0 + i, r, *v) };
            }
        }
    }
}

/// One row against up to [`TOK`] activation rows.
fn row_dot(dt: DType, row: Row<'_>, units: usize, acts: &[ActRow<'_>]) -> [f32; TOK] {
    let mut main = [0f32; TOK];
    let mut corr = [0f32; TOK];
    let (mut w, mut m) = ([0f32; 2 * CHUNK], [0f32; 2 * CHUNK]);
    let mut c = [0u8; 32];
    for c0 in (0..units).step_by(CHUNK) {
        let n = (units - c0).min(CHUNK);
        fmt::header(dt, row, c0, n, Signed8::No, &mut w, &mut m);
        for i in 0..n {
            let u = c0 + i;
            fmt::codes(dt, row, u, &mut c);
            for (t, a) in acts.iter().enumerate() {
                let q = &a.qs[u * UNIT..(u + 1) * UNIT];
                for h in 0..2 {
                    let mut s: i32 = (16 * h..16 * h + 16)
                        .map(|j| c[j] as i32 * q[j] as i32)
                        .sum();
                    if !a.res.is_empty() {
                        let r = &a.res[u * UNIT..(u + 1) * UNIT];
                        s = 256 * s
                            + (16 * h..16 * h + 16)
                                .map(|j| c[j] as i32 * r[j] as i32)
                                .sum::<i32>();
                    }
                    main[t] += (w[2 * i + h] * a.da[u]) * s as f32;
                    corr[t] += m[2 * i + h] * a.ah[2 * u + h];
                }
            }
        }
    }
    let mut r = [0f32; TOK];
    for t in 0..acts.len() {
        r[t] = main[t] + corr[t];
    }
    r
}

/// `Σ a[i]·b[i]` with eight partial sums.
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    sluice_core::ops::dot(a, b)
}
