//! The GPU kernels against the CPU backend, on whatever adapter wgpu finds
//! (lavapipe in CI, where `SLUICE_REQUIRE_GPU=1` makes a missing adapter a
//! failure; elsewhere the tests say they were skipped).

use sluice_backend_cpu::{Activations, CpuBackend, CpuOptions};
use sluice_backend_wgpu::{WgpuBackend, WgpuOptions, REQUIRE_ENV};
use sluice_core::ops::{Rope, RopeStyle};
use sluice_core::{
    fp8, quant, AttnParams, Backend, DType, Fp8Block, Fp8Scale, HalfType, MlxQuant, WeightView,
};

fn gpu(opts: WgpuOptions) -> Option<WgpuBackend> {
    match WgpuBackend::new(&opts) {
        Ok(b) => {
            eprintln!("GPU: {}", b.describe());
            Some(b)
        }
        Err(e) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("{REQUIRE_ENV} is set but the GPU backend is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// The CPU backend with exact products (f32 activations), which the GPU's
/// kernels reproduce.
fn exact_cpu() -> CpuBackend {
    CpuBackend::with_options(CpuOptions {
        threads: Some(2),
        activations: Activations::F32,
        isa: None,
    })
    .unwrap()
}

fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Largest |a-b| over the largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
}

struct Owned {
    dtype: DType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    scales: Vec<u8>,
    biases: Vec<u8>,
}

impl Owned {
    fn random(dtype: DType, rows: usize, cols: usize, seed: u64) -> Owned {
        let (mut data, mut scales, mut biases) = (Vec::new(), Vec::new(), Vec::new());
        match dtype {
            DType::Mlx(q) => {
                for r in 0..rows {
                    let row = floats(cols, seed * 1000 + r as u64);
                    quant::quantize_mlx(q, &row, &mut data, &mut scales, &mut biases).unwrap();
                }
            }
            DType::FP8(q) => {
                (data, scales) = fp8::quantize(q, &floats(rows * cols, seed), rows, cols).unwrap();
            }
            t => data = quant::random_tensor_bytes(t, rows * cols, seed, 0.5),
        }
        Owned {
            dtype,
            rows,
            cols,
            data,
            scales,
            biases,
        }
    }

    fn view(&self) -> WeightView<'_> {
        WeightView::with_aux(
            self.dtype,
            self.rows,
            self.cols,
            &self.data,
            &self.scales,
            &self.biases,
        )
        .unwrap()
    }
}

fn all_types() -> Vec<DType> {
    let mut v = DType::ALL.to_vec();
    for (bits, group, sc) in [
        (2, 64, HalfType::Bf16),
        (3, 64, HalfType::Bf16),
        (4, 32, HalfType::F16),
        (5, 128, HalfType::F32),
        (6, 64, HalfType::Bf16),
        (8, 64, HalfType::F16),
    ] {
        v.push(DType::Mlx(MlxQuant::new(bits, group, sc).unwrap()));
    }
    // FP8 tiles that split rows and columns unevenly, and DeepSeek's.
    v.push(DType::FP8(Fp8Block::new(5, 48, Fp8Scale::Bf16).unwrap()));
    v.push(DType::FP8(Fp8Block::new(32, 32, Fp8Scale::E8M0).unwrap()));
    v.push(DType::FP8(Fp8Block::new(128, 128, Fp8Scale::F32).unwrap()));
    v
}

#[test]
fn matmul_matches_cpu_for_every_type() {
    for rows in [0, 1, 8, 16] {
        let Some(g) = gpu(WgpuOptions {
            rows_per_invocation: Some(rows),
            ..WgpuOptions::default()
        }) else {
            return;
        };
        matmuls_match(&g);
    }
}

/// The fallbacks: shared-memory reduction, no native f16, other widths.
#[test]
fn matmul_fallbacks_match_cpu() {
    for (wg, rows) in [(1, 0), (64, 0), (8, 3)] {
        let Some(g) = gpu(WgpuOptions {
            workgroup: Some(wg),
            subgroups: false,
            f16: false,
            rows_per_invocation: Some(rows),
            ..WgpuOptions::default()
        }) else {
            return;
        };
        assert_eq!(g.workgroup(), wg);
        matmuls_match(&g);
    }
}

fn matmuls_match(g: &WgpuBackend) {
    let cpu = exact_cpu();
    for dt in all_types() {
        // Float types get a width that is not a multiple of 32.
        let cols = if dt.block_size() == 1 { 301 } else { 512 };
        let w = Owned::random(dt, 37, cols, 7);
        for n in [1usize, 3, 11] {
            let x = floats(n * cols, 99 + n as u64);
            let (mut a, mut b) = (vec![0f32; n * 37], vec![0f32; n * 37]);
            g.matmul(w.view(), &x, n, &mut a).unwrap();
            cpu.matmul(w.view(), &x, n, &mut b).unwrap();
            let e = rel_err(&a, &b);
            assert!(e < 1e-5, "{dt} n={n}: relative error {e}");
        }
    }
}

#[test]
fn split_bindings_give_the_same_products() {
    // 1 KiB bindings force row chunks and token chunks.
    let Some(g) = gpu(WgpuOptions {
        max_binding: Some(1024),
        ..WgpuOptions::default()
    }) else {
        return;
    };
    let cpu = exact_cpu();
    for dt in [
        DType::Q8_0,
        DType::Q4_K,
        DType::Mlx(MlxQuant::new(4, 64, HalfType::Bf16).unwrap()),
        DType::FP8(Fp8Block::new(7, 64, Fp8Scale::F16).unwrap()),
    ] {
        let (rows, cols, n) = (45, 256, 5);
        let w = Owned::random(dt, rows, cols, 3);
        let x = floats(n * cols, 5);
        let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        g.matmul(w.view(), &x, n, &mut a).unwrap();
        cpu.matmul(w.view(), &x, n, &mut b).unwrap();
        assert!(rel_err(&a, &b) < 1e-5, "{dt}: {}", rel_err(&a, &b));
        // A view starting mid-tile (FP8) keeps its rows' scales.
        let v = w.view().rows(9, 30);
        let (mut a, mut b) = (vec![0f32; n * 30], vec![0f32; n * 30]);
        g.matmul(v, &x, n, &mut a).unwrap();
        cpu.matmul(v, &x, n, &mut b).unwrap();
        assert!(
            rel_err(&a, &b) < 1e-5,
            "{dt} rows 9..39: {}",
            rel_err(&a, &b)
        );
    }
}

/// Weights lying in host memory the device imported (a streamer's slots)
/// are bound where they lie, at any word offset, split across bindings,
/// and multiply as the copied ones do; FP8 (whose scales are expanded) and
/// data off a word boundary are copied instead.
#[test]
fn weights_in_imported_host_memory_are_bound_in_place() {
    use sluice_core::DeviceExec;
    let cpu = exact_cpu();
    for max_binding in [None, Some(1024)] {
        let Some(g) = gpu(WgpuOptions {
            max_binding,
            ..WgpuOptions::default()
        }) else {
            return;
        };
        let x: &dyn DeviceExec = &g;
        let Some(align) = x.host_align() else {
            assert!(!g.is_cpu_adapter(), "lavapipe imports host memory");
            eprintln!("skipped: {} binds no host memory", g.describe());
            return;
        };
        let len = 64 * align;
        let mut store = vec![0u8; len + align];
        let start = store.as_ptr().align_offset(align);
        let region = &mut store[start..start + len];
        // `store` outlives the import (forgotten below).
        // SAFETY: not written while a product that reads it runs.
        assert!(unsafe { x.map_host(region.as_ptr(), len) }.unwrap());
        // Split bindings (1 KiB) for types whose rows fit one.
        let types = match max_binding {
            None => all_types(),
            Some(_) => vec![
                DType::Q8_0,
                DType::Q4_K,
                DType::Q6_K,
                DType::F16,
                DType::Mlx(MlxQuant::new(4, 64, HalfType::Bf16).unwrap()),
            ],
        };
        for dt in types {
            let cols = match (max_binding, dt.block_size()) {
                (Some(_), _) => 256,
                (None, 1) => 301,
                (None, _) => 512,
            };
            let w = Owned::random(dt, 37, cols, 11);
            for (off, in_place) in [(0, true), (36, true), (4100, true), (2, false)] {
                let in_place = in_place && !matches!(dt, DType::FP8(_));
                // Data at `off`, then the scales and biases, each at an odd
                // multiple of 4 bytes.
                let so = (off + w.data.len()).next_multiple_of(4) + 12;
                let bo = (so + w.scales.len()).next_multiple_of(4) + 4;
                assert!(bo + w.biases.len() <= len);
                region[off..off + w.data.len()].copy_from_slice(&w.data);
                region[so..so + w.scales.len()].copy_from_slice(&w.scales);
                region[bo..bo + w.biases.len()].copy_from_slice(&w.biases);
                let v = WeightView::with_aux(
                    dt,
                    37,
                    cols,
                    &region[off..off + w.data.len()],
                    &region[so..so + w.scales.len()],
                    &region[bo..bo + w.biases.len()],
                )
                .unwrap();
                for n in [1usize, 3] {
                    let xs = floats(n * cols, 5 + n as u64);
                    let (mut a, mut b) = (vec![0f32; n * 37], vec![0f32; n * 37]);
                    let before = g.device_traffic().unwrap();
                    g.matmul(v, &xs, n, &mut a).unwrap();
                    let t = g.device_traffic().unwrap().since(&before);
                    cpu.matmul(w.view(), &xs, n, &mut b).unwrap();
                    let e = rel_err(&a, &b);
                    let what = format!("{dt} at {off}, n={n}, binding {max_binding:?}");
                    assert!(e < 1e-5, "{what}: relative error {e}");
                    let bytes = (w.data.len() + w.scales.len() + w.biases.len()) as u64;
                    match in_place {
                        true => assert_eq!(
                            (t.weight_bytes_up, t.weight_bytes_bound),
                            (0, bytes),
                            "{what}"
                        ),
                        false => assert_eq!(t.weight_bytes_bound, 0, "{what}"),
                    }
                }
            }
        }
        x.forget_host(region.as_ptr());
        // Forgotten: copied again.
        let w = Owned::random(DType::Q8_0, 8, 64, 1);
        region[..w.data.len()].copy_from_slice(&w.data);
        let v =
            WeightView::with_aux(DType::Q8_0, 8, 64, &region[..w.data.len()], &[], &[]).unwrap();
        let before = g.device_traffic().unwrap();
        g.matmul(v, &floats(64, 1), 1, &mut [0f32; 8]).unwrap();
        let t = g.device_traffic().unwrap().since(&before);
        assert_eq!(
            (t.weight_bytes_up, t.weight_bytes_bound),
            (w.data.len() as u64, 0)
        );
    }
}

/// Rows gathered on the device by indices it holds (an embedding lookup of
/// a token it chose) are the host's dequantized rows exactly; the arg-max
/// picks as the host does (first of equal maxima, NaNs skipped).
#[test]
fn gathered_rows_and_argmax_match_the_host_exactly() {
    use sluice_core::{DevOp, DeviceExec};
    for max_binding in [None, Some(1024)] {
        let Some(g) = gpu(WgpuOptions {
            max_binding,
            ..WgpuOptions::default()
        }) else {
            return;
        };
        let x: &dyn DeviceExec = &g;
        for dt in all_types() {
            // 1 KiB bindings: rows split into chunks, fewer tokens.
            let (cols, toks) = match max_binding {
                Some(_) => (64, &[49u32, 0, 23][..]),
                None => (256, &[0u32, 49, 7, 7, 23][..]),
            };
            let small = dt.row_bytes(cols).is_ok_and(|b| b <= 256);
            if max_binding.is_some() && !small {
                continue;
            }
            let w = Owned::random(dt, 50, cols, 3);
            let v = w.view().with_id(sluice_core::fresh_weight_id());
            let out = x.alloc(toks.len() * cols).unwrap();
            let mut b = x.batch();
            let ib = b.upload_u32(toks).unwrap();
            assert!(b.gather_rows(&v, ib, toks.len(), out).unwrap(), "{dt}");
            let mut got = vec![0f32; toks.len() * cols];
            b.submit(&mut [(out, 0, &mut got)]).unwrap();
            for (t, row) in toks.iter().zip(got.chunks_exact(cols)) {
                let mut want = vec![0f32; cols];
                w.view().row_into(*t as usize, &mut want);
                let (a, e): (Vec<u32>, Vec<u32>) = (
                    row.iter().map(|f| f.to_bits()).collect(),
                    want.iter().map(|f| f.to_bits()).collect(),
                );
                assert_eq!(a, e, "{dt} row {t}, binding {max_binding:?}");
            }
            x.release(out);
        }
        // Without an id the weight is not resident: nothing is recorded.
        let w = Owned::random(DType::Q8_0, 8, 64, 1);
        let out = x.alloc(64).unwrap();
        let mut b = x.batch();
        let ib = b.upload_u32(&[3]).unwrap();
        assert!(!b.gather_rows(&w.view(), ib, 1, out).unwrap());
        b.submit(&mut []).unwrap();
        x.release(out);
    }
    let Some(g) = gpu(WgpuOptions::default()) else {
        return;
    };
    let x: &dyn DeviceExec = &g;
    let host = |v: &[f32]| {
        let mut best = 0;
        for (i, &f) in v.iter().enumerate() {
            if f > v[best] {
                best = i;
            }
        }
        best as u32
    };
    let mut cases: Vec<Vec<f32>> = vec![
        floats(1000, 4),
        vec![1.0, 3.0, 3.0, 2.0, 3.0],
        vec![f32::NEG_INFINITY; 9],
        vec![f32::NAN, 5.0, 7.0],
        vec![1.0, f32::NAN, 7.0, 7.0, f32::NAN],
        vec![-2.0],
    ];
    let mut ties = floats(517, 9);
    ties[300] = 50.0;
    ties[12] = 50.0;
    ties[511] = 50.0;
    cases.push(ties);
    for c in cases {
        let mut b = x.batch();
        let lb = b.upload(&c).unwrap();
        let o = b.scratch(1).unwrap();
        b.op(DevOp::Argmax {
            x: lb,
            len: c.len(),
            out: o,
        })
        .unwrap();
        let mut got = [0f32];
        b.submit(&mut [(o, 0, &mut got)]).unwrap();
        assert_eq!(got[0].to_bits(), host(&c), "{c:?}");
    }
}

#[test]
fn resident_weights_are_uploaded_once() {
    let Some(g) = gpu(WgpuOptions::default()) else {
        return;
    };
    let w = Owned::random(DType::Q8_0, 64, 256, 1);
    let id = sluice_core::fresh_weight_id();
    let x = floats(256, 2);
    let mut y = vec![0f32; 64];
    let before = g.uploaded_bytes();
    for _ in 0..3 {
        g.matmul(w.view().with_id(id), &x, 1, &mut y).unwrap();
    }
    assert_eq!(g.uploaded_bytes() - before, w.data.len() as u64);
    // Without an id (a streaming slot) every use uploads.
    for _ in 0..2 {
        g.matmul(w.view(), &x, 1, &mut y).unwrap();
    }
    assert_eq!(g.uploaded_bytes() - before, 3 * w.data.len() as u64);
}

#[test]
fn element_wise_kernels_match_cpu() {
    let Some(g) = gpu(WgpuOptions::default()) else {
        return;
    };
    let cpu = exact_cpu();
    // RMSNorm over 3 rows.
    let w = floats(96, 1);
    let x = floats(3 * 96, 2);
    let (mut a, mut b) = (x.clone(), x.clone());
    g.rms_norm(&mut a, &w, 1e-6).unwrap();
    cpu.rms_norm(&mut b, &w, 1e-6).unwrap();
    assert!(rel_err(&a, &b) < 1e-5);
    // RoPE, both pairings, partial rotary, far positions.
    for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
        let rope = Rope {
            theta: 10000.0,
            rot_dim: 16,
            style,
            yarn: None,
            factors: None,
        };
        let x = floats(4 * 2 * 32, 3);
        let (mut a, mut b) = (x.clone(), x.clone());
        g.rope(&rope, 5000, &mut a, 4, 32).unwrap();
        cpu.rope(&rope, 5000, &mut b, 4, 32).unwrap();
        assert!(rel_err(&a, &b) < 1e-5, "{style:?}");
        assert_ne!(a, x);
    }
    // Router softmax and top-k, with a tie that must go to the lower index.
    let mut l = floats(3 * 60, 4);
    l[7] = 5.0;
    l[9] = 5.0;
    let (mut a, mut b) = (l.clone(), l.clone());
    let (mut ca, mut cb) = (vec![0usize; 3 * 4], vec![0usize; 3 * 4]);
    g.route(&mut a, 3, 4, &mut ca).unwrap();
    cpu.route(&mut b, 3, 4, &mut cb).unwrap();
    assert_eq!(ca, cb);
    assert_eq!(&ca[..2], &[7, 9]);
    assert!(rel_err(&a, &b) < 1e-5);
}

#[test]
fn attention_matches_cpu() {
    let Some(g) = gpu(WgpuOptions::default()) else {
        return;
    };
    let cpu = exact_cpu();
    let sinks = [0.5, -1.0, 2.0, 0.0];
    for (window, chunk, sinks) in [
        (None, None, None),
        (Some(3), None, None),
        (None, Some(4), None),
        (Some(3), Some(6), None),
        (None, None, Some(&sinks[..])),
        (Some(3), None, Some(&sinks[..])),
    ] {
        let p = AttnParams {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
            window,
            chunk,
            sinks,
        };
        let (pos0, n) = (5, 3);
        let q = floats(n * 64, 1);
        let k = floats((pos0 + n) * 32, 2);
        let v = floats((pos0 + n) * 32, 3);
        let (mut a, mut b) = (vec![0f32; n * 64], vec![0f32; n * 64]);
        g.attention(&q, &k, &v, n, pos0, &p, &mut a).unwrap();
        cpu.attention(&q, &k, &v, n, pos0, &p, &mut b).unwrap();
        assert!(
            rel_err(&a, &b) < 1e-5,
            "window {window:?}, chunk {chunk:?}, sinks {}: {}",
            sinks.is_some(),
            rel_err(&a, &b)
        );
    }
}

#[test]
fn fused_mlp_matches_cpu() {
    let Some(g) = gpu(WgpuOptions::default()) else {
        return;
    };
    let cpu = exact_cpu();
    let gate = Owned::random(DType::Q4_K, 256, 256, 1);
    let up = Owned::random(DType::Q4_K, 256, 256, 2);
    let down = Owned::random(DType::Q6_K, 256, 256, 3);
    let n = 9;
    let x = floats(n * 256, 4);
    let (mut a, mut b) = (vec![0f32; n * 256], vec![0f32; n * 256]);
    let w = [gate.view(), up.view(), down.view()];
    g.mlp(w, &x, n, &mut a).unwrap();
    cpu.mlp(w, &x, n, &mut b).unwrap();
    assert!(rel_err(&a, &b) < 1e-4, "{}", rel_err(&a, &b));
}

/// Calls of the same shapes reuse the buffers of the first (none is
/// created once the pools are warm), each waits once (the router's
/// probabilities and choices come back together), and fresh contents in
/// reused buffers give fresh results: with inputs mapped in place and
/// staged through the queue.
#[test]
fn pooled_buffers_are_reused_with_one_wait_per_call() {
    for mapped in [true, false] {
        let Some(g) = gpu(WgpuOptions {
            mapped,
            ..WgpuOptions::default()
        }) else {
            return;
        };
        let cpu = exact_cpu();
        let p = AttnParams {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
            window: None,
            chunk: None,
            sinks: None,
        };
        let rope = Rope {
            theta: 10000.0,
            rot_dim: 16,
            style: RopeStyle::Neox,
            yarn: None,
            factors: None,
        };
        let mut before = None;
        for round in 0..4u64 {
            if round == 1 {
                before = g.device_traffic();
            }
            let s = 10 * round;
            // A streamed expert (no id): its bytes differ every round.
            let w = Owned::random(DType::Q4_K, 64, 256, s + 1);
            let m = [
                Owned::random(DType::Q8_0, 64, 256, s + 2),
                Owned::random(DType::Q8_0, 64, 256, s + 3),
                Owned::random(DType::Q8_0, 256, 64, s + 4),
            ];
            let x = floats(256, s + 5);
            let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
            g.matmul(w.view(), &x, 1, &mut a).unwrap();
            cpu.matmul(w.view(), &x, 1, &mut b).unwrap();
            assert!(rel_err(&a, &b) < 1e-4, "mapped {mapped}, round {round}");
            let mv = [m[0].view(), m[1].view(), m[2].view()];
            let (mut a, mut b) = (vec![0f32; 256], vec![0f32; 256]);
            g.mlp(mv, &x, 1, &mut a).unwrap();
            cpu.mlp(mv, &x, 1, &mut b).unwrap();
            assert!(rel_err(&a, &b) < 1e-4, "mapped {mapped}, round {round}");
            let (mut a, mut b) = (x.clone(), x.clone());
            let nw = floats(256, s + 6);
            g.rms_norm(&mut a, &nw, 1e-6).unwrap();
            cpu.rms_norm(&mut b, &nw, 1e-6).unwrap();
            assert!(rel_err(&a, &b) < 1e-5);
            let (mut a, mut b) = (x[..64].to_vec(), x[..64].to_vec());
            g.rope(&rope, 7 + round as usize, &mut a, 1, 16).unwrap();
            cpu.rope(&rope, 7 + round as usize, &mut b, 1, 16).unwrap();
            assert!(rel_err(&a, &b) < 1e-5);
            let l = floats(60, s + 7);
            let (mut a, mut b) = (l.clone(), l.clone());
            let (mut ca, mut cb) = (vec![0usize; 4], vec![0usize; 4]);
            g.route(&mut a, 1, 4, &mut ca).unwrap();
            cpu.route(&mut b, 1, 4, &mut cb).unwrap();
            assert_eq!(ca, cb, "mapped {mapped}, round {round}");
            let (q, k, v) = (
                floats(64, s + 8),
                floats(6 * 32, s + 9),
                floats(6 * 32, s + 10),
            );
            let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
            g.attention(&q, &k, &v, 1, 5, &p, &mut a).unwrap();
            cpu.attention(&q, &k, &v, 1, 5, &p, &mut b).unwrap();
            assert!(rel_err(&a, &b) < 1e-5);
        }
        let t = g.device_traffic().unwrap().since(&before.unwrap());
        assert_eq!(t.buffers_created, 0, "mapped {mapped}: {t:?}");
        assert_eq!((t.submissions, t.waits), (3 * 6, 3 * 6), "{t:?}");
        let weights = 3 * (w_bytes(DType::Q4_K, 64, 256) + 3 * w_bytes(DType::Q8_0, 64, 256));
        assert_eq!(t.weight_bytes_up, weights, "{t:?}");
        // Outputs, and the router's probabilities with its choices.
        let down = 64 + 256 + 256 + 64 + (60 + 4) + 64;
        assert_eq!(t.bytes_down, 3 * 4 * down, "{t:?}");
    }
}

fn w_bytes(dtype: DType, rows: usize, cols: usize) -> u64 {
    dtype.tensor_bytes(&[rows, cols]).unwrap() as u64
}
