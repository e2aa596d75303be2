//! The GPU backend (`--backend wgpu`) through the forward pass: on
//! lavapipe in CI (`SLUICE_REQUIRE_GPU=1` turns a missing adapter into a
//! failure), on Metal on a Mac; elsewhere the tests say they were skipped.

mod common;

use common::*;
use sluice_backend_cpu::{Activations, CpuBackend, CpuOptions};
use sluice_backend_wgpu::{WgpuBackend, WgpuOptions, REQUIRE_ENV};
use sluice_core::Backend;
use sluice_engine::{Model, Session};
use std::path::Path;
use std::sync::Arc;

fn gpu() -> Option<Arc<WgpuBackend>> {
    match WgpuBackend::new(&WgpuOptions::default()) {
        Ok(b) => Some(Arc::new(b)),
        Err(e) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("{REQUIRE_ENV} is set but the GPU backend is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn logits(path: &Path, be: Arc<dyn Backend>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let model = Arc::new(Model::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let mut s = Session::new(model.clone(), be);
    // Prompt, then one token at a time: batched and single-row kernels.
    let half = tokens.len() / 2;
    let mut l = s.forward(&tokens[..half], true).unwrap();
    for t in &tokens[half..] {
        l.extend(s.forward(&[*t], true).unwrap());
    }
    l.chunks_exact(model.config.vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn every_fixture_matches_the_cpu_backend_on_the_gpu() {
    let Some(g) = gpu() else { return };
    // The GPU keeps activations in f32: compare with the CPU's exact path.
    let cpu: Arc<dyn Backend> = Arc::new(
        CpuBackend::with_options(CpuOptions {
            threads: Some(2),
            activations: Activations::F32,
            isa: None,
        })
        .unwrap(),
    );
    let mut checked = 0;
    for (model, exp) in oracles() {
        let e = read_expected(&exp);
        let on_gpu = logits(&model, g.clone(), &e.tokens);
        let on_cpu = logits(&model, cpu.clone(), &e.tokens);
        let name = model.display().to_string();
        assert_close(&name, &on_gpu, &on_cpu, 1e-3);
        assert_close(&name, &on_gpu, &e.logits, 1e-3);
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} fixtures");
    assert!(g.device_seconds().unwrap() > 0.0);
}

fn cli_logits(args: &[&str]) -> serde_json::Value {
    let (out, _) = run_ok(args);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn streamed_experts_on_the_gpu_equal_resident_ones_bit_for_bit() {
    if gpu().is_none() {
        return;
    }
    for name in ["qwen3_moe", "qwen3_5_moe_mlx", "qwen2_moe.q4_0.gguf"] {
        let p = fixtures().join("models").join(name);
        let m = p.to_str().unwrap();
        let base = [
            "logits",
            "--model",
            m,
            "--tokens",
            "1,5,9,2,7,3",
            "--backend",
            "wgpu",
        ];
        let resident = cli_logits(&base);
        for io in ["uring", "pread"] {
            let mut a = base.to_vec();
            a.extend(["--ram-cap", "256M", "--io", io, "--cache-slots", "2"]);
            let streamed = cli_logits(&a);
            assert_eq!(
                streamed["logits"], resident["logits"],
                "{name} with {io}: streamed GPU logits differ from resident ones"
            );
        }
    }
}

#[test]
fn bench_reports_gpu_time() {
    if gpu().is_none() {
        return;
    }
    let p = fixtures().join("models/qwen3_moe");
    let (out, _) = run_ok(&[
        "bench",
        "--model",
        p.to_str().unwrap(),
        "--backend",
        "metal",
        "--tokens",
        "4",
        "--prompt-tokens",
        "3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.to_string().contains("GPU backend:"), "{v}");
    let g = v["gpu_decode_s"].as_f64().expect("gpu_decode_s");
    assert!(
        g > 0.0 && g <= v["decode_s"].as_f64().unwrap() * 1.01,
        "{v}"
    );
    assert!(v["gpu_s_per_token"].as_f64().unwrap() > 0.0);
    // Its traffic: each submission waited for, and once the pools are warm
    // (the second pass) no buffer is created.
    // Two MoE layers: one submission each (the logits share the next
    // token's first, the device guessing the greedy token bench feeds).
    let subs = v["gpu_submissions_per_token"].as_f64().unwrap();
    assert!(subs >= 2.0, "{v}");
    assert_eq!(v["gpu_waits_per_token"].as_f64(), Some(subs), "{v}");
    assert!(v["gpu_bytes_down_per_token"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(
        v["warm"]["gpu_buffers_created_per_token"].as_f64(),
        Some(0.0),
        "{v}"
    );
    // Under a RAM cap, the GPU's resident copies (lavapipe shares the
    // host's RAM) are planned beside the dense weights.
    let (out, _) = run_ok(&[
        "bench",
        "--model",
        p.to_str().unwrap(),
        "--backend",
        "wgpu",
        "--ram-cap",
        "2G",
        "--gpu-resident",
        "64M",
        "--tokens",
        "2",
        "--prompt-tokens",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let b = &v["budget"];
    let (dense, slot) = (b["dense"].as_u64().unwrap(), b["slot"].as_u64().unwrap());
    assert_eq!(
        b["device"].as_u64(),
        Some(dense.min(64 << 20) + slot),
        "{v}"
    );
    assert!(v.to_string().contains("GPU copies"), "{v}");
}

#[test]
fn streamed_experts_are_bound_in_place_on_unified_memory() {
    let Some(g) = gpu() else { return };
    let Some(align) = g.device_exec().and_then(|x| x.host_align()) else {
        // Only a CPU adapter without the import extension may lack it.
        assert!(!g.is_cpu_adapter(), "lavapipe imports host memory");
        eprintln!("skipped: {} binds no host memory", g.describe());
        return;
    };
    assert!(align.is_power_of_two(), "{align}");
    let bench = |name: &str, io: &str, copy: bool| {
        let p = fixtures().join("models").join(name);
        let mut a = vec![
            "bench",
            "--model",
            p.to_str().unwrap(),
            "--backend",
            "wgpu",
            "--ram-cap",
            "256M",
            "--cache-slots",
            "8",
            "--io",
            io,
            "--tokens",
            "4",
            "--prompt-tokens",
            "3",
            "--json",
        ];
        if copy {
            a.push("--gpu-copy-experts");
        }
        let (out, _) = run_ok(&a);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let w = &v["warm"];
        let f = |k: &str| w[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
        (
            f("gpu_weight_bytes_up_per_token"),
            f("gpu_weight_bytes_bound_per_token"),
        )
    };
    // Safetensors, MLX (scales and biases bound too), GGUF's Q4_0 and
    // 16-bit types, latent attention; O_DIRECT reads and buffered ones.
    for (name, ios) in [
        ("qwen3_moe", &["pread", "uring"][..]),
        ("qwen2_moe.q4_0.gguf", &["pread", "uring"]),
        ("qwen3_5_moe_mlx", &["pread"]),
        ("olmoe.bf16.gguf", &["pread"]),
        ("mixtral.f16.gguf", &["uring"]),
        ("deepseek_v3", &["pread"]),
    ] {
        for &io in ios {
            // A decode token copies no weight byte: the drive wrote the
            // experts where the kernels read them.
            let (up, bound) = bench(name, io, false);
            assert_eq!(
                up, 0.0,
                "{name} with {io}: {up} weight bytes copied per token"
            );
            assert!(bound > 0.0, "{name} with {io}");
            // Copying instead moves the same bytes.
            let (up_c, bound_c) = bench(name, io, true);
            assert_eq!((up_c, bound_c), (bound, 0.0), "{name} with {io}");
        }
    }
}

/// Every fixture model (folders and GGUF files).
fn fixture_models() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    v.sort();
    v
}

#[test]
fn the_device_path_submits_once_per_moe_layer_and_matches_the_per_call_path() {
    use sluice_engine::model::Ffn;
    let Some(g) = gpu() else { return };
    let tokens = [1u32, 5, 9, 2, 7, 3, 4];
    let mut resident = 0;
    for path in fixture_models() {
        let name = path.display().to_string();
        let model = Arc::new(Model::open(&path).unwrap_or_else(|e| panic!("{name}: {e}")));
        let c = &model.config;
        let moe = model
            .layers
            .iter()
            .filter(|l| matches!(l.ffn, Ffn::Moe(_)))
            .count() as u64;
        let mut dev = Session::new(model.clone(), g.clone());
        let mut per_call = Session::new(model.clone(), g.clone());
        per_call.set_device_forward(false);
        assert!(!per_call.is_device_resident());
        assert!(dev.is_device_resident(), "{name}");
        resident += 1;
        // A first run uploads the weights it meets and fills the pools.
        // The run below's greedy tokens (first: wrong guesses stop the
        // guessing), then others.
        let mut warm = Session::new(model.clone(), g.clone());
        let mut l = warm.forward(&tokens[..3], false).unwrap();
        for _ in 0..4 {
            l = warm
                .forward(&[sluice_engine::Sampler::argmax(&l)], false)
                .unwrap();
        }
        for &t in &tokens[3..] {
            warm.forward(&[t], false).unwrap();
        }
        drop(warm);
        let start = g.device_traffic().unwrap();
        let mut a = dev.forward(&tokens[..3], false).unwrap();
        let mut b = per_call.forward(&tokens[..3], false).unwrap();
        for _ in 0..4 {
            // Greedy decoding: the device's guess of the token is right.
            let t = sluice_engine::Sampler::argmax(&a[a.len() - c.vocab..]);
            let before = g.device_traffic().unwrap();
            a.extend(dev.forward(&[t], true).unwrap());
            let d = g.device_traffic().unwrap().since(&before);
            // One submission and one wait per MoE layer (to read its
            // router's logits; the first layer's came with the last
            // token's logits); nothing read back but those and the
            // guessed token; no buffer created in a warm backend.
            assert_eq!(d.submissions, moe, "{name}: {d:?}");
            assert!(d.submissions <= model.layers.len() as u64, "{name}: {d:?}");
            assert_eq!(d.waits, d.submissions, "{name}: {d:?}");
            let down = (moe * c.n_experts as u64 + c.vocab as u64 + 1) * 4;
            assert_eq!(d.bytes_down, down, "{name}: {d:?}");
            assert_eq!(d.buffers_created, 0, "{name}: {d:?}");
            b.extend(per_call.forward(&[t], true).unwrap());
        }
        // The same tokens meet the same weights: a second session
        // uploads none (the per-head slices and transposed keys of latent
        // attention included).
        let d = g.device_traffic().unwrap().since(&start);
        assert_eq!(d.weight_bytes_up, 0, "{name}: {d:?}");
        let rows = |l: Vec<f32>| -> Vec<Vec<f32>> {
            l.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect()
        };
        assert_close(&name, &rows(a), &rows(b), 1e-4);
    }
    assert!(resident >= 31, "{resident} fixtures on the device path");
}

#[test]
fn guessing_the_next_token_never_changes_the_output() {
    let Some(g) = gpu() else { return };
    // DeltaNet first layers (their states put back after a wrong guess),
    // a dense first layer, softmax attention with sinks and windows.
    for name in [
        "qwen3_5_moe",
        "qwen3_next",
        "deepseek_v3",
        "qwen3_moe",
        "gpt_oss",
    ] {
        let model = Arc::new(Model::open(fixtures().join("models").join(name)).unwrap());
        let vocab = model.config.vocab as u32;
        let mut on = Session::new(model.clone(), g.clone());
        let mut off = Session::new(model.clone(), g.clone());
        off.set_guess_next(false);
        let (a, b) = (
            on.forward(&[1, 5, 9], false).unwrap(),
            off.forward(&[1, 5, 9], false).unwrap(),
        );
        assert_eq!(a, b, "{name}: prompt");
        let mut last = a;
        let (mut subs_on, mut subs_off) = (0, 0);
        // Greedy tokens mostly, every third one not (the guess is wrong),
        // and a snapshot and a park taken while a guess is pending.
        let mut snap = None;
        for i in 0..9 {
            let best = sluice_engine::Sampler::argmax(&last);
            let t = if i % 3 == 2 { (best + 1) % vocab } else { best };
            let t0 = g.device_traffic().unwrap();
            let a = on.forward(&[t], false).unwrap();
            let t1 = g.device_traffic().unwrap();
            let b = off.forward(&[t], false).unwrap();
            let t2 = g.device_traffic().unwrap();
            subs_on += t1.since(&t0).submissions;
            subs_off += t2.since(&t1).submissions;
            assert_eq!(a, b, "{name}: token {i}");
            if i == 4 {
                snap = Some((on.snapshot().unwrap(), on.park().unwrap(), a.clone()));
            }
            last = a;
        }
        assert!(subs_on < subs_off, "{name}: {subs_on} against {subs_off}");
        // Back to the snapshot and the parked state: the same continuation
        // as the session without guesses gives from there.
        let (snap, parked, at) = snap.unwrap();
        let t = sluice_engine::Sampler::argmax(&at);
        off.restore(&parked).unwrap();
        let want = off.forward(&[t], false).unwrap();
        // A new session taking the parked state up runs on the device too.
        let mut fresh = Session::new(model.clone(), g.clone());
        fresh.restore(&parked).unwrap();
        assert!(fresh.is_device_resident(), "{name}");
        assert_eq!(
            fresh.forward(&[t], false).unwrap(),
            want,
            "{name}: new session"
        );
        on.restore(&parked).unwrap();
        assert_eq!(on.forward(&[t], false).unwrap(), want, "{name}: parked");
        on.restore(&snap).unwrap();
        assert_eq!(on.forward(&[t], false).unwrap(), want, "{name}: snapshot");
        // Reset with a guess pending.
        on.reset();
        off.reset();
        assert_eq!(
            on.forward(&[2, 7], false).unwrap(),
            off.forward(&[2, 7], false).unwrap(),
            "{name}: reset"
        );
    }
}

#[test]
fn device_sessions_reset_snapshot_and_park_exactly() {
    let Some(g) = gpu() else { return };
    // A hybrid model: the DeltaNet layers' states live on the device too.
    for name in ["qwen3_5_moe", "qwen3_moe"] {
        let model = Arc::new(Model::open(fixtures().join("models").join(name)).unwrap());
        let mut s = Session::new(model.clone(), g.clone());
        assert!(s.is_device_resident(), "{name}");
        let first = s.forward(&[1, 5, 9], false).unwrap();
        // The state it reports holds what the per-call path's would.
        let mut host = Session::new(model.clone(), g.clone());
        host.set_device_forward(false);
        host.forward(&[1, 5, 9], false).unwrap();
        assert_eq!(s.kv_bytes(), host.kv_bytes(), "{name}");
        let snap = s.snapshot().unwrap();
        let a = s.forward(&[2, 7], true).unwrap();
        s.restore(&snap).unwrap();
        assert_eq!(s.forward(&[2, 7], true).unwrap(), a, "{name}: restored");
        let parked = s.park().unwrap();
        let next = s.forward(&[4], false).unwrap();
        s.reset();
        assert_eq!(
            s.forward(&[1, 5, 9], false).unwrap(),
            first,
            "{name}: reset"
        );
        s.restore(&parked).unwrap();
        assert_eq!(s.forward(&[4], false).unwrap(), next, "{name}: parked");
    }
}

#[test]
fn the_device_path_runs_long_batches_and_grows_its_cache() {
    let Some(g) = gpu() else { return };
    let model = Arc::new(Model::open(fixtures().join("models/qwen3_moe")).unwrap());
    let tokens: Vec<u32> = (0..300u32)
        .map(|i| (i * 7 + 3) % model.config.vocab as u32)
        .collect();
    let mut dev = Session::new(model.clone(), g.clone());
    let mut per_call = Session::new(model.clone(), g.clone());
    per_call.set_device_forward(false);
    // 200 tokens: four passes of 64 rows and a 256-position cache; then
    // 100 more, which double it (keeping the first 200 positions).
    let mut got = Vec::new();
    let mut want = Vec::new();
    for part in [&tokens[..200], &tokens[200..]] {
        got.extend(dev.forward(part, true).unwrap());
        want.extend(per_call.forward(part, true).unwrap());
    }
    got.extend(dev.forward(&[5], true).unwrap());
    want.extend(per_call.forward(&[5], true).unwrap());
    let rows = |l: Vec<f32>| -> Vec<Vec<f32>> {
        l.chunks_exact(model.config.vocab)
            .map(<[f32]>::to_vec)
            .collect()
    };
    assert_close("qwen3_moe, 301 positions", &rows(got), &rows(want), 1e-3);
    // Greedy tokens across the cache's growth: the entries of a right
    // guess (written past the last token) survive the doubling.
    let mut on = Session::new(model.clone(), g.clone());
    let mut off = Session::new(model.clone(), g.clone());
    off.set_guess_next(false);
    let mut a = on.forward(&tokens[..250], false).unwrap();
    let b = off.forward(&tokens[..250], false).unwrap();
    assert_eq!(a, b);
    for i in 250..262 {
        let t = sluice_engine::Sampler::argmax(&a);
        a = on.forward(&[t], false).unwrap();
        assert_eq!(a, off.forward(&[t], false).unwrap(), "position {i}");
    }
}

#[test]
fn a_cache_beyond_one_binding_is_refused_clearly() {
    if gpu().is_none() {
        return;
    }
    let g = Arc::new(
        WgpuBackend::new(&WgpuOptions {
            max_binding: Some(64 << 10),
            ..WgpuOptions::default()
        })
        .unwrap(),
    );
    let model = Arc::new(Model::open(fixtures().join("models/qwen3_moe")).unwrap());
    let mut s = Session::new(model.clone(), g);
    let tokens: Vec<u32> = (0..4000u32)
        .map(|i| i % model.config.vocab as u32)
        .collect();
    // Short sequences fit; the cache's growth past one binding is an
    // error that says so, not a panic or a device fault.
    s.forward(&tokens[..8], false).unwrap();
    let err = s.forward(&tokens[8..], false).unwrap_err().to_string();
    assert!(err.contains("binding limit"), "{err}");
}
