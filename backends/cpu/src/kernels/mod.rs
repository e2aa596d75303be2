//! Matrix-product kernels, one module per instruction set.
//!
//! Two families:
//!
//! * **8-bit activations** (the default for quantized weights): the input
//!   rows are quantized per 32 values (`act.rs`) and each weight unit's
//!   codes are dotted with them in integers, dequantization fused into the
//!   product (`fmt.rs` states the arithmetic). llama.cpp computes its
//!   quantized products the same way.
//! * **f32 activations**: F32/F16/BF16 weights always, quantized weights
//!   when exact products are asked for. A chunk of a row (512 weights) is
//!   dequantized exactly into a buffer that stays in L1 and dotted with
//!   every input row.
//!
//! The instruction set is picked at run time ([`Isa::detect`]) and can be
//! forced (`SLUICE_CPU_ISA`, [`crate::CpuOptions::isa`]) so that tests run
//! every one the machine has. Each kernel computes a row's result from
//! that row's bytes alone, in a fixed order, so a product does not depend
//! on how rows are split between threads or on where the bytes live.

pub mod fmt;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use crate::act::{Layout, QAct};
use fmt::Row;
use sluice_core::{fp8, quant, DType, WeightView};

/// An instruction set the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (the reference).
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/DQ/VL with VNNI and VBMI (Ice Lake, Sapphire
    /// Rapids, Zen 4 and later).
    Avx512,
    /// aarch64 NEON (every aarch64 CPU).
    Neon,
    /// aarch64 NEON with the dot-product instructions (Apple M1 and A13
    /// onwards, most ARM servers).
    NeonDot,
}

impl Isa {
    /// Every instruction set this build knows.
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::NeonDot];

    /// Name as `SLUICE_CPU_ISA` and the benchmarks spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dot",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s))
    }

    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vbmi")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            _ => false,
        }
    }

    /// The instruction sets this CPU runs, best last.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// The best instruction set of this CPU.
    pub fn detect() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Scalar)
    }
}

/// Where a kernel writes `y[t][r]` (`n × rows`, token-major). Threads write
/// disjoint row ranges of the same output, so it is a raw pointer.
#[derive(Clone, Copy)]
pub struct Out {
    ptr: *mut f32,
    rows: usize,
    len: usize,
}

// SAFETY: an `Out` is only written through `put`, whose callers own
// disjoint row ranges (documented at `put`); the buffer outlives the job.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// An output over `y` (`n × rows`).
    pub fn new(y: &mut [f32], rows: usize) -> Out {
        Out {
            ptr: y.as_mut_ptr(),
            rows,
            len: y.len(),
        }
    }

    /// Writes `y[t][r]`.
    ///
    /// # Safety
    /// No other thread may write or read row `r` of this output while the
    /// job runs, and the `y` it was made from must still be borrowed by the
    /// job's caller.
    #[inline(always)]
    pub unsafe fn put(&self, t: usize, r: usize, v: f32) {
        let i = t * self.rows + r;
        assert!(i < self.len, "output index out of range");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { *self.ptr.add(i) = v };
    }
}

impl Out {
    /// `y[t][r] = silu(y[t][r]) · up[t][r]` (SwiGLU of a gate row in place).
    ///
    /// # Safety
    /// As for [`Out::put`], for both outputs.
    #[inline(always)]
    pub unsafe fn swiglu(&self, up: Out, t: usize, r: usize) {
        let i = t * self.rows + r;
        assert!(i < self.len && i < up.len, "output index out of range");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe {
            let g = *self.ptr.add(i);
            *self.ptr.add(i) = sluice_core::ops::silu(g) * *up.ptr.add(i);
        }
    }
}

/// The rows of a weight matrix, with their byte counts computed once (a
/// division per row is a measurable share of a decode step).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    w: WeightView<'a>,
    rb: usize,
    ab: usize,
    /// FP8: rows per scale line (scale lines are shared by rows).
    br: usize,
}

impl<'a> Rows<'a> {
    /// The rows of `w`.
    #[inline]
    pub fn new(w: &WeightView<'a>) -> Rows<'a> {
        let (ab, br) = match w.dtype {
            DType::Mlx(q) => (q.aux_row_bytes(w.cols), 0),
            DType::FP8(q) => (q.aux_row_bytes(w.cols), q.block_rows as usize),
            _ => (0, 0),
        };
        Rows {
            w: *w,
            rb: w.row_bytes(),
            ab,
            br,
        }
    }

    /// Bytes of one row.
    #[inline(always)]
    pub fn row_bytes(&self) -> usize {
        self.rb
    }

    /// Row `r`.
    #[inline(always)]
    pub fn row(&self, r: usize) -> Row<'a> {
        let (rb, ab) = (self.rb, self.ab);
        if let Some(l) = (self.w.block_row0 + r).checked_div(self.br) {
            return Row {
                data: &self.w.data[r * rb..(r + 1) * rb],
                scales: &self.w.scales[l * ab..(l + 1) * ab],
                biases: &[],
            };
        }
        Row {
            data: &self.w.data[r * rb..(r + 1) * rb],
            scales: &self.w.scales[r * ab..(r + 1) * ab],
            biases: &self.w.biases[r * ab..(r + 1) * ab],
        }
    }
}

/// AVX2 MLX 4-bit: a unit's even values, then its odd ones.
static EVEN_ODD: [u8; 32] = {
    let mut p = [0u8; 32];
    let mut k = 0;
    while k < 32 {
        p[k] = if k < 16 { 2 * k } else { 2 * (k - 16) + 1 } as u8;
        k += 1;
    }
    p
};

/// AVX2 MLX 2-bit: the four 2-bit fields of eight bytes, field by field.
static FIELDS2: [u8; 32] = {
    let mut p = [0u8; 32];
    let mut k = 0;
    while k < 32 {
        p[k] = (4 * (k % 8) + k / 8) as u8;
        k += 1;
    }
    p
};

/// The activation order of the one-unit-per-step kernels (AVX2, NEON)
/// for `dt`.
pub fn unit_layout(dt: DType) -> Layout {
    let perm: Option<&'static [u8]> = match dt {
        DType::Mlx(q) if q.bits == 4 => Some(&EVEN_ODD),
        DType::Mlx(q) if q.bits == 2 => Some(&FIELDS2),
        _ => None,
    };
    Layout {
        step: 1,
        perm,
        wide: false,
    }
}

/// The activation layout `isa`'s integer kernel for `dt` reads, with the
/// residual plane or without.
pub fn q8_layout(isa: Isa, dt: DType, residual: bool) -> Layout {
    // Only AVX-512 widens activations with their residual.
    let _ = residual;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::avx512_layout(dt, residual),
        Isa::Avx2 | Isa::Neon | Isa::NeonDot => unit_layout(dt),
        _ => Layout::NATURAL,
    }
}

/// Whether `dt` has 8-bit-activation kernels (every block-quantized type;
/// floats and FP8 take the f32 path).
pub const fn integer(dt: DType) -> bool {
    dt.is_quantized()
}

/// Rows `r0..r1` of `w` against the quantized activations `act` (made with
/// [`q8_layout`]`(isa, w.dtype)`).
pub fn q8_tile(isa: Isa, w: &WeightView<'_>, r0: usize, r1: usize, act: &QAct, out: Out) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` other than Scalar is only used where
        // `supported()` said the CPU has it (CpuBackend checks).
        Isa::Avx512 => unsafe { x86::avx512_q8_tile(w, r0, r1, act, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::avx2_q8_tile(w, r0, r1, act, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above (NeonDot only where `dotprod` was detected).
        Isa::Neon | Isa::NeonDot => unsafe {
            neon::q8_tile(isa == Isa::NeonDot, w, r0, r1, act, out)
        },
        _ => scalar::q8_tile(w, r0, r1, act, out),
    }
}

/// Quantizes one unit of activations on `isa` (bit-identical to
/// [`crate::act::quantize_unit`] and its residual form): returns the code
/// step and the integer sums of the halves.
#[inline]
pub fn quantize_unit(
    isa: Isa,
    x: &[f32],
    q: &mut [i8; 32],
    r: Option<&mut [i8; 32]>,
) -> (f32, [i32; 2]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `q8_tile`.
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::quantize_unit(x, q, r) },
        _ => match r {
            Some(r) => crate::act::quantize_unit_residual(x, q, r),
            None => crate::act::quantize_unit(x, q),
        },
    }
}

/// Stores a step of codes in the order `perm` gives (see `act::Layout`).
#[inline]
pub fn place(isa: Isa, out: &mut [i8], nat: &[i8], perm: Option<&[u8]>) {
    match (isa, perm) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `q8_tile`.
        (Isa::Avx512, Some(p)) if out.len() == 64 => unsafe { x86::permute64(out, nat, p) },
        _ => crate::act::place(out, nat, perm),
    }
}

/// Weights per chunk of the f32 path (a multiple of every block and group
/// size, small enough for L1).
const FCHUNK: usize = 512;

/// Rows `r0..r1` of `w` against `n` f32 rows of `x`: weights dequantized
/// exactly, chunk by chunk, products in f32.
pub fn f32_tile(isa: Isa, w: &WeightView<'_>, r0: usize, r1: usize, x: &[f32], n: usize, out: Out) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && matches!(w.dtype, DType::F32 | DType::F16 | DType::BF16) {
        // SAFETY: see `q8_tile`.
        return unsafe { x86::avx512_float_tile(w, r0, r1, x, n, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if let DType::FP8(q) = w.dtype {
        if isa == Isa::Avx512 && q.block_cols.is_multiple_of(16) {
            // SAFETY: see `q8_tile`.
            return unsafe { x86::avx512_fp8_tile(w, q, r0, r1, x, n, out) };
        }
    }
    let cols = w.cols;
    let mut buf = [0f32; FCHUNK];
    let mut acc = vec![0f32; n];
    let rows = Rows::new(w);
    for r in r0..r1 {
        let row = rows.row(r);
        acc.iter_mut().for_each(|a| *a = 0.0);
        for c0 in (0..cols).step_by(FCHUNK) {
            let len = (cols - c0).min(FCHUNK);
            let wv = &mut buf[..len];
            chunk_f32(w.dtype, row, c0, wv);
            for (t, a) in acc.iter_mut().enumerate() {
                *a += dot(isa, wv, &x[t * cols + c0..t * cols + c0 + len]);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: the caller owns rows r0..r1 of `out`.
            unsafe { out.put(t, r, *a) };
        }
    }
}

/// Weights `c0..c0 + out.len()` of `row`, dequantized exactly.
fn chunk_f32(dt: DType, row: Row<'_>, c0: usize, out: &mut [f32]) {
    let len = out.len();
    match dt {
        DType::Mlx(q) => {
            let g = q.group as usize;
            let hb = q.scales.bytes();
            let (b0, b1) = (c0 * q.bits as usize / 8, (c0 + len) * q.bits as usize / 8);
            let (g0, g1) = (c0 / g * hb, (c0 + len) / g * hb);
            quant::dequantize_mlx_unchecked(
                q,
                &row.data[b0..b1],
                &row.scales[g0..g1],
                &row.biases[g0..g1],
                out,
            )
        }
        DType::FP8(q) => fp8::dequantize_unchecked(q, &row.data[c0..c0 + len], row.scales, c0, out),
        _ => {
            let (b0, b1) = (
                c0 / dt.block_size() * dt.block_bytes(),
                (c0 + len) / dt.block_size() * dt.block_bytes(),
            );
            quant::dequantize_unchecked(dt, &row.data[b0..b1], out)
        }
    }
}

/// `Σ a[i]·b[i]` on `isa`.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `q8_tile`.
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::dot_f32(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => neon::dot_f32(a, b),
        _ => scalar::dot_f32(a, b),
    }
}
