//! Activations quantized for the integer kernels.
//!
//! Each unit of 32 consecutive activations gets its own scale
//! (`d = max|x| / 127`, `q = round(x / d)`, ties to even), as in llama.cpp's
//! Q8_0 activations (whose scale is an f16; ours is an f32). On the tiny
//! oracle models that alone moves logits by 1-10% of their range and flips
//! routing choices (docs/BENCHMARKS.md), so by default a second byte plane
//! holds the rounding residual in 1/256 steps (`r = round((x/d - q)·256)`):
//! the kernels compute `256·Σc·q + Σc·r`, an exact integer equal to the dot
//! product with 16-bit activations, for two more instructions per 64
//! weights. The codes of a unit are stored in the byte order the weight
//! kernel unpacks its codes in (see [`Layout`]), so no kernel shuffles
//! activations; the sums of each half unit, scaled, serve the zero-point
//! and min terms (`fmt.rs`).

use crate::kernels::{self, fmt::UNIT, Isa};

/// The order of activation bytes a kernel expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Units a kernel step reads together (1 or 2); units per token are
    /// padded to a multiple of it with zeros.
    pub step: usize,
    /// `perm[k]` is the index, within the step's `32·step` activations, of
    /// the one stored at byte `k`; `None` keeps the natural order.
    pub perm: Option<&'static [u8]>,
    /// With the residual: store `256·q + r` as one 16-bit value (`wide`)
    /// instead of two byte planes, for kernels that multiply 16-bit
    /// activations (AVX-512's `vpdpwssd`).
    pub wide: bool,
}

impl Layout {
    /// Natural order, one unit per step.
    pub const NATURAL: Layout = Layout {
        step: 1,
        perm: None,
        wide: false,
    };
}

/// `n` rows of activations quantized per unit.
#[derive(Default)]
pub struct QAct {
    /// Rows (tokens).
    pub n: usize,
    /// Units per row, padded to the layout's step.
    pub units: usize,
    /// Whether `res` holds the residual plane.
    pub residual: bool,
    /// `n · units · 32` codes, in the layout's order.
    pub qs: Vec<i8>,
    /// The residual codes, like `qs` (empty without the residual plane).
    pub res: Vec<i8>,
    /// With a wide layout, `256·q + r` per value in the layout's order
    /// (and `qs`, `res` empty).
    pub wide: Vec<i16>,
    /// `n · units` multipliers of a unit's integer sums: `d`, or `d/256`
    /// with the residual plane (whose sums are `256·Σc·q + Σc·r`).
    pub da: Vec<f32>,
    /// `n · units · 2`: `da · Σ q` over each half unit (natural halves).
    pub ah: Vec<f32>,
    /// `n · units`: `da · Σ q` over each unit.
    pub au: Vec<f32>,
}

impl QAct {
    /// Quantizes `n` rows of `cols` values (`cols` a multiple of 32) for
    /// `layout`, with the residual plane when `residual`, reusing this
    /// buffer's memory.
    pub fn quantize(
        &mut self,
        x: &[f32],
        n: usize,
        cols: usize,
        layout: Layout,
        residual: bool,
        isa: Isa,
    ) {
        debug_assert!(cols.is_multiple_of(UNIT) && x.len() == n * cols);
        let units = (cols / UNIT).next_multiple_of(layout.step);
        self.n = n;
        self.units = units;
        self.residual = residual;
        self.qs.clear();
        self.qs.resize(n * units * UNIT, 0);
        let wide = residual && layout.wide;
        self.res.clear();
        self.wide.clear();
        if wide {
            self.qs.clear();
            self.wide.resize(n * units * UNIT, 0);
        } else if residual {
            self.res.resize(n * units * UNIT, 0);
        }
        self.da.clear();
        self.da.resize(n * units, 0.0);
        self.ah.clear();
        self.ah.resize(n * units * 2, 0.0);
        self.au.clear();
        self.au.resize(n * units, 0.0);
        let step = UNIT * layout.step;
        let (mut nat, mut nres) = ([0i8; 64], [0i8; 64]);
        for t in 0..n {
            let xr = &x[t * cols..(t + 1) * cols];
            let span = t * units * UNIT..(t + 1) * units * UNIT;
            for (u, xu) in xr.chunks_exact(UNIT).enumerate() {
                let at = t * units + u;
                let k = (u % layout.step) * UNIT;
                let q: &mut [i8; 32] = (&mut nat[k..k + UNIT]).try_into().unwrap();
                let (d, h) = if residual {
                    let r: &mut [i8; 32] = (&mut nres[k..k + UNIT]).try_into().unwrap();
                    let (d, h) = kernels::quantize_unit(isa, xu, q, Some(r));
                    (d / 256.0, h)
                } else {
                    kernels::quantize_unit(isa, xu, q, None)
                };
                self.da[at] = d;
                self.ah[2 * at] = d * h[0] as f32;
                self.ah[2 * at + 1] = d * h[1] as f32;
                self.au[at] = d * (h[0] + h[1]) as f32;
                if u % layout.step == layout.step - 1 || u == cols / UNIT - 1 {
                    let s0 = span.start + (u / layout.step) * step;
                    if wide {
                        for k in 0..step {
                            let i = layout.perm.map_or(k, |p| p[k] as usize);
                            self.wide[s0 + k] = 256 * nat[i] as i16 + nres[i] as i16;
                        }
                    } else {
                        kernels::place(isa, &mut self.qs[s0..s0 + step], &nat[..step], layout.perm);
                        if residual {
                            kernels::place(
                                isa,
                                &mut self.res[s0..s0 + step],
                                &nres[..step],
                                layout.perm,
                            );
                        }
                    }
                    nat = [0; 64];
                    nres = [0; 64];
                }
            }
        }
    }

    /// Row `t`'s codes, scales and half sums.
    pub fn row(&self, t: usize) -> ActRow<'_> {
        let u = self.units;
        let span = t * u * UNIT..(t + 1) * u * UNIT;
        fn part<T>(v: &[T], span: std::ops::Range<usize>) -> &[T] {
            if v.is_empty() {
                &[]
            } else {
                &v[span]
            }
        }
        ActRow {
            qs: part(&self.qs, span.clone()),
            res: part(&self.res, span.clone()),
            wide: part(&self.wide, span),
            da: &self.da[t * u..(t + 1) * u],
            ah: &self.ah[2 * t * u..2 * (t + 1) * u],
            au: &self.au[t * u..(t + 1) * u],
        }
    }
}

/// One row of [`QAct`].
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    /// Codes, `units · 32`.
    pub qs: &'a [i8],
    /// Residual codes, like `qs` (empty without the residual plane).
    pub res: &'a [i8],
    /// `256·q + r` in a wide layout (else empty).
    pub wide: &'a [i16],
    /// Scale per unit.
    pub da: &'a [f32],
    /// Scaled sums per half unit.
    pub ah: &'a [f32],
    /// Scaled sums per unit.
    pub au: &'a [f32],
}

/// Quantizes one unit: returns the scale and the integer sums of the two
/// halves. The rounding is that of `vcvtps2dq`/`fcvtns` (to nearest, ties
/// to even), so SIMD versions may give the same bytes.
#[inline]
pub fn quantize_unit(x: &[f32], q: &mut [i8; 32]) -> (f32, [i32; 2]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut h = [0i32; 2];
    for (i, (o, &v)) in q.iter_mut().zip(x).enumerate() {
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        *o = r as i8;
        h[i / 16] += r;
    }
    (d, h)
}

/// Stores one step's codes in the layout's order.
pub fn place(out: &mut [i8], nat: &[i8], perm: Option<&[u8]>) {
    match perm {
        None => out.copy_from_slice(nat),
        Some(p) => {
            for (o, &i) in out.iter_mut().zip(p) {
                *o = nat[i as usize];
            }
        }
    }
}

/// Quantizes one unit with the residual plane: returns `d` (the code
/// step; the residual's step is `d/256`) and the sums of `256·q + r` over
/// the two halves. `x/d - q` is exact in f32 and the scaling by 256 too,
/// so SIMD versions may give the same bytes.
#[inline]
pub fn quantize_unit_residual(x: &[f32], q: &mut [i8; 32], r: &mut [i8; 32]) -> (f32, [i32; 2]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut h = [0i32; 2];
    for (i, &v) in x.iter().enumerate() {
        let t = v * id;
        let a = t.round_ties_even().clamp(-127.0, 127.0);
        let b = ((t - a) * 256.0).round_ties_even().clamp(-127.0, 127.0);
        q[i] = a as i8;
        r[i] = b as i8;
        h[i / 16] += 256 * a as i32 + b as i32;
    }
    (d, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction set gives the portable code's bytes, scales and
    /// sums, with and without the residual plane.
    #[test]
    fn simd_quantization_is_bit_identical() {
        let x: Vec<f32> = (0..320)
            .map(|i| {
                ((i * 7919 % 1013) as f32 - 506.0) / 37.0 * if i % 97 == 0 { 40.0 } else { 1.0 }
            })
            .collect();
        for isa in Isa::available() {
            for residual in [false, true] {
                for layout in [
                    Layout::NATURAL,
                    kernels::q8_layout(isa, sluice_core::DType::Q4_0, residual),
                ] {
                    let (mut a, mut b) = (QAct::default(), QAct::default());
                    a.quantize(&x, 2, 160, layout, residual, Isa::Scalar);
                    b.quantize(&x, 2, 160, layout, residual, isa);
                    assert_eq!(a.qs, b.qs, "{}", isa.name());
                    assert_eq!(a.res, b.res, "{}", isa.name());
                    assert_eq!(a.da, b.da, "{}", isa.name());
                    assert_eq!(a.ah, b.ah, "{}", isa.name());
                    assert_eq!(a.au, b.au, "{}", isa.name());
                }
            }
        }
    }

    #[test]
    fn quantization_is_within_half_a_step_and_sums_halves() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 61) as f32 - 30.0) / 7.0)
            .collect();
        let mut a = QAct::default();
        a.quantize(&x, 1, 96, Layout::NATURAL, false, Isa::Scalar);
        assert_eq!(a.units, 3);
        for u in 0..3 {
            let d = a.da[u];
            let mut h = [0f32; 2];
            for i in 0..32 {
                let q = a.qs[u * 32 + i] as f32;
                assert!((q * d - x[u * 32 + i]).abs() <= 0.5 * d * 1.0001);
                h[i / 16] += q;
            }
            assert_eq!(a.ah[2 * u], d * h[0]);
            assert_eq!(a.ah[2 * u + 1], d * h[1]);
        }
    }

    #[test]
    fn a_permuted_layout_stores_the_same_codes_in_its_order_and_pads() {
        static REV: [u8; 64] = {
            let mut p = [0u8; 64];
            let mut i = 0;
            while i < 64 {
                p[i] = 63 - i as u8;
                i += 1;
            }
            p
        };
        let x: Vec<f32> = (0..96).map(|i| i as f32 - 40.0).collect();
        let (mut a, mut b) = (QAct::default(), QAct::default());
        a.quantize(&x, 1, 96, Layout::NATURAL, false, Isa::Scalar);
        b.quantize(
            &x,
            1,
            96,
            Layout {
                step: 2,
                perm: Some(&REV),
                wide: false,
            },
            false,
            Isa::Scalar,
        );
        assert_eq!(b.units, 4);
        for k in 0..64 {
            assert_eq!(b.qs[k], a.qs[63 - k]);
        }
        // The third unit is alone in its step: the padding is zeros.
        for k in 0..64 {
            let want = if 63 - k < 32 { a.qs[64 + 63 - k] } else { 0 };
            assert_eq!(b.qs[64 + k], want);
        }
        assert_eq!(b.da[3], 0.0);
    }

    #[test]
    fn the_residual_plane_brings_the_error_to_a_256th_of_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 3.7)
            .collect();
        let mut a = QAct::default();
        a.quantize(&x, 1, 64, Layout::NATURAL, true, Isa::Scalar);
        for u in 0..2 {
            let m = a.da[u];
            for i in 0..32 {
                let (q, r) = (a.qs[u * 32 + i] as f32, a.res[u * 32 + i] as f32);
                let v = m * (256.0 * q + r);
                // Half a residual step, or a whole one where the clamp at
                // 127 cuts a residual of exactly half a code.
                assert!((v - x[u * 32 + i]).abs() <= m * 1.001 + 1e-6);
            }
        }
    }
}
