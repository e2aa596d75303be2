//! The simulator and the simulated-device backend through the CLI: the
//! simulator's cache is the engine's (same hits as a real run on the same
//! routes), its JSON answers the bench's question, sweeps write their CSV
//! and SVG, bad input fails clearly, and `--backend sim` changes times,
//! never outputs.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sim");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn json(args: &[&str]) -> serde_json::Value {
    let (out, _) = run_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// A routing trace with locality: each token keeps some of the previous
/// token's experts at each layer.
fn write_trace(path: &Path, layers: usize, experts: usize, k: usize, steps: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut prev: Vec<Vec<u64>> = vec![Vec::new(); layers];
    let mut routes = Vec::new();
    for pos in 0..steps {
        let mut ls = serde_json::Map::new();
        for (l, p) in prev.iter_mut().enumerate() {
            let mut v: Vec<u64> = Vec::new();
            while v.len() < k {
                let e = if !p.is_empty() && next() % 3 == 0 {
                    p[(next() % p.len() as u64) as usize]
                } else {
                    // Skewed popularity: low ids are favoured.
                    let a = next() % experts as u64;
                    let b = next() % experts as u64;
                    a.min(b)
                };
                if !v.contains(&e) {
                    v.push(e);
                }
            }
            ls.insert(
                l.to_string(),
                serde_json::json!({"experts": v, "weights": vec![0.25; k]}),
            );
            *p = v;
        }
        routes.push(serde_json::json!({"token_pos": pos, "token_id": 1000 + pos, "phase": if pos < 4 { "prefill" } else { "decode" }, "layers": ls}));
    }
    let t = serde_json::json!({"meta": {"model_id": "test", "num_layers": layers, "num_experts": experts, "top_k": k},
        "routes": routes});
    std::fs::write(path, t.to_string()).unwrap();
}

/// A 3-layer synthetic small-moe, written once per test run (tests run
/// in parallel threads).
fn small_model() -> PathBuf {
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let out = scratch("small3.gguf");
            run_ok(&[
                "synth",
                "--preset",
                "small-moe",
                "--layers",
                "3",
                "--quant",
                "q4",
                "-o",
                out.to_str().unwrap(),
                "--quiet",
            ]);
            out
        })
        .clone()
}

/// Same routes, same slots, same policy: the simulator's hits and bytes are
/// the engine's, because it runs the engine's cache code.
#[test]
fn simulated_cache_is_the_engines() {
    let m = small_model();
    let t = scratch("small3.trace.json");
    write_trace(&t, 3, 64, 4, 40);
    let (m, t) = (m.to_str().unwrap(), t.to_str().unwrap());
    for (slots, policy) in [("12", "lru"), ("30", "lfu")] {
        let flags = [
            "--model",
            m,
            "--replay",
            t,
            "--cache-slots",
            slots,
            "--cache-policy",
            policy,
            "--prefetch",
            "none",
            "--tokens",
            "24",
            "--prompt-tokens",
            "4",
            "--ram-cap",
            "512M",
            "--io",
            "pread",
            "--json",
        ];
        let mut b = vec!["bench", "--probe-seconds", "0.1", "--no-warm"];
        b.extend_from_slice(&flags);
        let mut s = vec!["sim", "--device", "dev-vm", "--no-warm"];
        s.extend_from_slice(&flags);
        let (bj, sj) = (json(&b), json(&s));
        let (bh, sh) = (
            bj["hit_rate"].as_f64().unwrap(),
            sj["hit_rate"].as_f64().unwrap(),
        );
        assert!(
            bh > 0.05 && bh < 0.95,
            "a cap that forces some misses: {bh}"
        );
        assert!(
            (bh - sh).abs() < 1e-9,
            "{slots} {policy}: bench hit rate {bh}, sim {sh}"
        );
        let (bb, sb) = (
            bj["bytes_read_per_token"].as_f64().unwrap(),
            sj["bytes_read_per_token"].as_f64().unwrap(),
        );
        assert!(
            (bb - sb).abs() <= 0.03 * bb,
            "bytes/token: bench {bb}, sim {sb}"
        );
        assert_eq!(sj["simulated"], true);
    }
}

/// Prefetch admission: on a saturated drive, and in a cache with no room
/// to spare, guesses at routes that cannot be predicted cost little (they
/// wait, are dropped unread, or recycle scratch slots), while a perfect
/// predictor on a faster drive still hides most of the reads.
#[test]
fn prefetch_admission_bounds_the_cost_of_wrong_guesses() {
    let m = small_model();
    let t = scratch("small3.admit.json");
    write_trace(&t, 3, 64, 4, 160);
    let (m, t) = (m.to_str().unwrap(), t.to_str().unwrap());
    let run_with = |gbps: &str, pf: &str, extra: &[&str]| {
        let mut a = vec![
            "sim",
            "--model",
            m,
            "--device",
            "iphone-17-pro",
            "--flash-gbps",
            gbps,
            "--replay",
            t,
            "--cache-slots",
            "12",
            "--tokens",
            "150",
            "--prompt-tokens",
            "4",
            "--prefetch",
            pf,
            "--no-warm",
            "--json",
        ];
        a.extend_from_slice(extra);
        json(&a)
    };
    let run = |gbps: &str, pf: &str| run_with(gbps, pf, &[]);
    for gbps in ["0.3", "3"] {
        let none = run(gbps, "none")["tok_per_s"].as_f64().unwrap();
        for pf in ["xlayer", "token"] {
            let x = run(gbps, pf);
            let xt = x["tok_per_s"].as_f64().unwrap();
            assert!(
                x["prefetch_precision"].as_f64().unwrap() < 0.4,
                "the trace is meant to be hard to predict: {x}"
            );
            assert!(
                xt >= 0.95 * none,
                "{pf} at {gbps} GB/s: wrong guesses cost {:.1}% ({xt} vs {none} tok/s)",
                100.0 * (1.0 - xt / none)
            );
        }
    }
    // Every token id is new, so only a table from an earlier session
    // (here: this very trace) knows them: seeded, the token predictor
    // knows each token's routes before its forward pass. (Its guesses are
    // scored 1/1.5 at best, so on a cache this small the floor keeps many
    // of them out, where the oracle's certainties pass.)
    let seeded = run_with("3", "token", &["--prefetch-seed", t]);
    let unseeded = run("3", "token");
    let f = |j: &serde_json::Value, k: &str| j[k].as_f64().unwrap();
    assert!(
        seeded["notes"].to_string().contains("seeded with 1 trace"),
        "{seeded}"
    );
    assert!(
        f(&seeded, "tok_per_s") > 1.08 * f(&unseeded, "tok_per_s")
            && f(&seeded, "prefetch_precision") > 0.9
            && f(&seeded, "prefetch_recall") > 2.0 * f(&unseeded, "prefetch_recall"),
        "seeded {seeded}\nunseeded {unseeded}"
    );
    let none = run("3", "none");
    let oracle = run("3", "oracle");
    let (n, o) = (
        none["tok_per_s"].as_f64().unwrap(),
        oracle["tok_per_s"].as_f64().unwrap(),
    );
    assert!(
        o > 1.15 * n,
        "a perfect predictor overlaps reads: {o} vs {n}"
    );
    assert!(
        oracle["prefetch_recall"].as_f64().unwrap() > 0.9,
        "{oracle}"
    );
    assert_eq!(oracle["prefetch_precision"].as_f64(), Some(1.0));
}

/// The question the bench answers, for a device one does not have.
#[test]
fn sim_answers_with_the_bench_keys() {
    let j = json(&[
        "sim",
        "--device",
        "iphone-17-pro",
        "--model",
        "qwen3.5-397b-a17b",
        "--quant",
        "mlx2",
        "--experts-k",
        "4",
        "--tokens",
        "6",
        "--prompt-tokens",
        "2",
        "--json",
    ]);
    for k in [
        "tok_per_s",
        "ttft_s",
        "hit_rate",
        "bytes_read_per_token",
        "stall_s",
        "per_layer",
    ] {
        assert!(!j[k].is_null(), "missing {k}: {j}");
    }
    let tps = j["tok_per_s"].as_f64().unwrap();
    let bound = j["flash_bound_tok_per_s"].as_f64().unwrap();
    assert!(
        tps > 0.0 && tps <= bound * 1.0001,
        "{tps} above the flash bound {bound}"
    );
    assert_eq!(j["top_k"], 4);
    // Default cap: what one app may use on the device.
    let cap = j["ram_cap_bytes"].as_u64().unwrap();
    assert!((5_000_000_000..13_000_000_000).contains(&cap), "{cap}");
    let notes = j["notes"].to_string();
    assert!(notes.contains("--experts-k 4"), "{notes}");
    assert_eq!(j["per_layer"].as_array().unwrap().len(), 60);
    // The page cache with a given hit rate (flash-moe's set-up).
    let p = json(&[
        "sim",
        "--device",
        "macbook-pro-m3-max-48gb",
        "--model",
        "qwen3.5-397b-a17b",
        "--experts-k",
        "4",
        "--io",
        "mmap",
        "--hit-rate",
        "0.71",
        "--tokens",
        "40",
        "--no-warm",
        "--json",
    ]);
    let h = p["hit_rate"].as_f64().unwrap();
    assert!((h - 0.71).abs() < 0.05, "{h}");
}

/// A GPU profile charges the engine's host-device round trips: by default
/// the two its per-layer cost holds; `--syncs-per-layer` charges another
/// engine's count, and the decode time moves by their difference.
#[test]
fn sim_charges_round_trips_per_layer() {
    let run = |syncs: Option<&str>| {
        let mut a = vec![
            "sim",
            "--device",
            "macbook-pro-m3-max-48gb",
            "--model",
            "qwen3-30b-a3b",
            "--ram-cap",
            "64G",
            "--tokens",
            "4",
            "--prompt-tokens",
            "1",
            "--json",
        ];
        if let Some(s) = syncs {
            a.extend(["--syncs-per-layer", s]);
        }
        json(&a)
    };
    let (base, one, many) = (run(None), run(Some("1")), run(Some("16")));
    // 48 layers at the profile's 100 µs a round trip.
    let per = |j: &serde_json::Value| j["sync_s_per_token"].as_f64().unwrap();
    assert!((per(&base) - 2.0 * 48.0 * 100e-6).abs() < 1e-9, "{base}");
    assert!((per(&one) - 48.0 * 100e-6).abs() < 1e-9, "{one}");
    assert_eq!(many["syncs_per_layer"].as_f64(), Some(16.0));
    // Everything resident, no reads: decode time is compute alone.
    let token = |j: &serde_json::Value| j["warm"]["decode_s"].as_f64().unwrap() / 4.0;
    let d = token(&many) - token(&base);
    assert!((d - 14.0 * 48.0 * 100e-6).abs() < 1e-6, "{d}");
    assert!(token(&one) < token(&base));
    // A profile without a round-trip cost cannot charge one.
    let err = fails(&[
        "sim",
        "--device",
        "dev-vm",
        "--model",
        "qwen3-30b-a3b",
        "--syncs-per-layer",
        "2",
    ]);
    assert!(err.contains("sync_us") && err.contains("dev-vm"), "{err}");
}

/// A flash sweep writes one CSV row per point, tok/s never falls as the
/// drive gets faster, and the SVG is drawn.
#[test]
fn sweeps_write_csv_and_svg() {
    let out = scratch("flash-sweep");
    let o = out.to_str().unwrap();
    run_ok(&[
        "sim",
        "--device",
        "iphone-17-pro",
        "--model",
        "qwen3-30b-a3b",
        "--layers",
        "8",
        "--tokens",
        "6",
        "--prompt-tokens",
        "2",
        "--sweep",
        "flash=0.5:8:6",
        "--out",
        o,
    ]);
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 7, "{csv}");
    assert!(rows[0].starts_with("flash_gbps,tok_per_s"), "{csv}");
    let tps: Vec<f64> = rows[1..]
        .iter()
        .map(|r| r.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(tps.windows(2).all(|w| w[1] >= w[0] * 0.999), "{tps:?}");
    assert!(tps[5] > tps[0], "{tps:?}");
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("flash bound"),
        "SVG drawn"
    );
    // A RAM sweep leaves holes where the cap is too small, and fills the rest.
    let out = scratch("ram-sweep");
    run_ok(&[
        "sim",
        "--device",
        "dev-vm",
        "--model",
        "qwen3-30b-a3b",
        "--tokens",
        "4",
        "--prompt-tokens",
        "2",
        "--sweep",
        "ram=512M:8G:4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(
        rows[0].split(',').nth(1).unwrap().is_empty(),
        "512M is too small: {csv}"
    );
    assert!(
        !rows[3].split(',').nth(1).unwrap().is_empty(),
        "8G fits: {csv}"
    );
}

#[test]
fn bad_sim_input_fails_clearly() {
    let err = fails(&["sim", "--device", "pixel-99", "--model", "qwen3-30b-a3b"]);
    assert!(
        err.contains("pixel-99") && err.contains("iphone-17-pro"),
        "{err}"
    );
    let p = scratch("bad.toml");
    let good = include_str!("../sim/profiles/iphone-17-pro.toml");
    std::fs::write(
        &p,
        good.replacen("read_gbps = { value = 1.2", "read_gbps = { value = -1.2", 1),
    )
    .unwrap();
    let err = fails(&[
        "sim",
        "--device",
        p.to_str().unwrap(),
        "--model",
        "qwen3-30b-a3b",
    ]);
    assert!(
        err.contains("bad.toml") && err.contains("flash.read_gbps"),
        "{err}"
    );
    std::fs::write(&p, "name = \"x\"\n[memory]\n").unwrap();
    let err = fails(&[
        "sim",
        "--device",
        p.to_str().unwrap(),
        "--model",
        "qwen3-30b-a3b",
    ]);
    assert!(
        err.contains("bad.toml") && err.contains("missing field"),
        "{err}"
    );
    let err = fails(&["sim", "--model", "gpt-9"]);
    assert!(
        err.contains("gpt-9") && err.contains("qwen3.5-397b-a17b"),
        "{err}"
    );
    let err = fails(&["sim", "--model", "qwen3-30b-a3b", "--prefetch", "gate"]);
    assert!(err.contains("hidden states"), "{err}");
    let err = fails(&["sim", "--model", "qwen3-30b-a3b", "--sweep", "disk=1:2"]);
    assert!(err.contains("--sweep"), "{err}");
    let err = fails(&["sim", "--model", "qwen3-30b-a3b", "--ram-cap", "1G"]);
    assert!(err.contains("too small"), "{err}");
    let err = fails(&["sim", "--model", "qwen3.5-397b-a17b", "--experts-k", "0"]);
    assert!(err.contains("--experts-k"), "{err}");
    let err = fails(&["probe", "/nonexistent", "--burst-gap-ms", "5000"]);
    assert!(err.contains("--burst-gap-ms"), "{err}");
}

/// `--backend sim` computes with the CPU backend: the same logits; it
/// reports device time beside wall time.
#[test]
fn sim_backend_changes_times_not_outputs() {
    let m = fixtures().join("models/qwen3_moe");
    let m = m.to_str().unwrap();
    let toks = "261,267,270,276,262,274,16,262";
    let cpu = run_ok(&["logits", "--model", m, "--tokens", toks, "--ram-cap", "64M"]).0;
    let (sim, err) = run_ok(&[
        "logits",
        "--model",
        m,
        "--tokens",
        toks,
        "--backend",
        "sim",
        "--device",
        "iphone-17-pro",
        "--ram-cap",
        "64M",
        "--cache-slots",
        "2",
    ]);
    assert_eq!(cpu, sim, "numerics must not change");
    assert!(err.contains("simulated device iphone-17-pro"), "{err}");
    let small = small_model();
    let j = json(&[
        "bench",
        "--model",
        small.to_str().unwrap(),
        "--backend",
        "sim",
        "--device",
        "iphone-17-pro",
        "--ram-cap",
        "96M",
        "--tokens",
        "4",
        "--prompt-tokens",
        "2",
        "--probe-seconds",
        "0.1",
        "--no-warm",
        "--json",
    ]);
    let d = j["device_tok_per_s"].as_f64().unwrap();
    let stall = j["device_stall_s"].as_f64().unwrap();
    let dec = j["device_decode_s"].as_f64().unwrap();
    assert!(d > 0.0 && (d - 4.0 / dec).abs() < 1e-9 * d.max(1.0), "{j}");
    assert!(
        stall > 0.0 && stall < dec,
        "misses stall on the device: {stall} of {dec}"
    );
    assert_eq!(j["backend"], "sim");
}

/// `sluice probe --profile` writes a `host` profile the simulator reads
/// back, whose drive bandwidth is the median of the burst windows it
/// reports (a window slowed by a neighbour's I/O cannot set it).
#[test]
fn probe_writes_a_host_profile_fitted_to_bursts_after_idle() {
    let dir = scratch("probe");
    std::fs::create_dir_all(&dir).unwrap();
    let prof = scratch("probe-host.toml");
    let j = json(&[
        "probe",
        dir.to_str().unwrap(),
        "--file-size",
        "32M",
        "--sizes",
        "4K,512K",
        "--qd",
        "1,4",
        "--seconds",
        "1.5",
        "--burst-gap-ms",
        "5",
        "--profile",
        prof.to_str().unwrap(),
        "--json",
    ]);
    // Back-to-back windows, kept for comparison.
    let w: Vec<f64> = j["burst_window_gbps"]
        .as_array()
        .expect("burst windows")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(w.len(), 3, "1.5 s in half-second windows: {w:?}");
    assert!(w.windows(2).all(|p| p[0] <= p[1]) && w[0] > 0.0, "{w:?}");
    assert_eq!(j["burst_gbps"].as_f64(), Some(w[1]));
    // Bursts after the idle gap, of 2 to 64 reads (past the queue depth
    // of 4 the engine keeps 4 in flight).
    let idle = &j["idle_bursts"];
    assert_eq!(idle["gap_s"].as_f64(), Some(0.005), "{idle}");
    assert!(idle["rounds"].as_u64().unwrap() >= 9, "{idle}");
    let sizes: Vec<(f64, f64)> = idle["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let n = x["reads"].as_u64().unwrap();
            ((n * (512 << 10)) as f64, x["median_s"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(sizes.len(), 6, "{idle}");
    assert!(sizes.iter().all(|s| s.1 > 0.0), "{idle}");
    let text = std::fs::read_to_string(&prof).unwrap();
    let figure = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| {
                l.split("value = ")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{key} in the profile: {text}"))
    };
    let (gbps, lat) = (figure("read_gbps"), figure("latency_us"));
    match (idle["gbps"].as_f64(), idle["fixed_us"].as_f64()) {
        (Some(g), Some(f)) => {
            // A least-squares line: residuals orthogonal to the bytes, and
            // (unless the fixed cost was clamped at zero) summing to zero.
            let res: Vec<(f64, f64)> = sizes
                .iter()
                .map(|&(b, t)| (b, t - (f * 1e-6 + b / (g * 1e9))))
                .collect();
            let scale: f64 = sizes.iter().map(|s| s.0 * s.1).sum();
            let by_bytes: f64 = res.iter().map(|r| r.0 * r.1).sum();
            assert!(by_bytes.abs() < 1e-6 * scale, "{res:?}");
            if f > 0.0 {
                let sum: f64 = res.iter().map(|r| r.1).sum();
                let total: f64 = sizes.iter().map(|s| s.1).sum();
                assert!(sum.abs() < 1e-6 * total, "{res:?}");
            }
            assert!((gbps - g).abs() < 1e-9 * g, "{gbps} vs {g}");
            assert!((lat - f).abs() < 1e-9 * f.max(1.0), "{lat} vs {f}");
            assert!(text.contains("after 5 ms idle"), "{text}");
        }
        _ => {
            assert!((gbps - w[1]).abs() < 1e-9 * w[1], "{gbps} vs {w:?}");
            assert!(text.contains("no usable fit"), "{text}");
        }
    }
    // The simulator takes it as a device.
    let s = json(&[
        "sim",
        "--device",
        prof.to_str().unwrap(),
        "--model",
        "qwen3-30b-a3b",
        "--tokens",
        "2",
        "--prompt-tokens",
        "1",
        "--json",
    ]);
    assert!(s["tok_per_s"].as_f64().unwrap() > 0.0, "{s}");
}

/// `bench --profile-out` writes the profile the run observed (the drive
/// the engine waited on, the kernels as the forward pass ran them), which
/// `sim --device FILE` runs with the same flags and the same cache
/// behaviour; `--device host` reads this machine's profile where
/// SLUICE_HOST_PROFILE says, and names the variable when the file is
/// missing.
#[test]
fn bench_writes_the_profile_it_observed() {
    let m = small_model();
    let t = scratch("small3.observed.json");
    write_trace(&t, 3, 64, 4, 40);
    let out = scratch("observed.toml");
    let (m, t, o) = (
        m.to_str().unwrap(),
        t.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let flags = [
        "--model",
        m,
        "--replay",
        t,
        "--cache-slots",
        "12",
        "--prefetch",
        "none",
        "--tokens",
        "24",
        "--prompt-tokens",
        "4",
        "--io",
        "pread",
        "--json",
    ];
    let mut b = vec![
        "bench",
        "--probe-seconds",
        "0.1",
        "--no-warm",
        "--profile-out",
        o,
    ];
    b.extend_from_slice(&flags);
    let bj = json(&b);
    assert_eq!(bj["profile_out"], o);
    let text = std::fs::read_to_string(&out).unwrap();
    for want in [
        "this machine, measured",
        "observed by `",
        "[compute.matvec_gbps_by_quant]",
        "Q4_0 = ",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    let mut s = vec!["sim", "--device", o, "--no-warm"];
    s.extend_from_slice(&flags);
    let sj = json(&s);
    assert!(sj["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!((sj["hit_rate"].as_f64().unwrap() - bj["hit_rate"].as_f64().unwrap()).abs() < 1e-9);
    // The host profile where the environment says.
    let mut h = vec!["sim", "--device", "host", "--no-warm"];
    h.extend_from_slice(&flags);
    let r = sluice()
        .env("SLUICE_HOST_PROFILE", o)
        .args(&h)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let missing = scratch("no-such-profile.toml");
    let r = sluice()
        .env("SLUICE_HOST_PROFILE", &missing)
        .args(&h)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("SLUICE_HOST_PROFILE") && err.contains("no such file"),
        "{err}"
    );
    // Only the CPU backend is this machine.
    let mut bad = vec![
        "bench",
        "--backend",
        "sim",
        "--device",
        "dev-vm",
        "--profile-out",
        o,
    ];
    bad.extend_from_slice(&flags[..4]);
    let err = fails(&bad);
    assert!(
        err.contains("--profile-out") && err.contains("--backend cpu"),
        "{err}"
    );
}

/// The DeepSeek-V3 and GLM-4.5 presets: the simulator's geometry of a
/// preset is the geometry of the file `sluice synth` writes for it (dense
/// bytes, KV cache, latent or not, compute), and the real models answer on
/// the phone.
#[test]
fn sigmoid_router_presets_match_their_synthesized_files() {
    for small in ["small-deepseek", "small-glm"] {
        preset_matches_its_file(small, 6);
    }
    for (model, quant, layers) in [
        ("deepseek-v3", "q2_k", 61),
        ("kimi-k2", "q4_0", 61),
        ("glm-4.5", "q2_k", 92),
        ("glm-4.5-air", "q4_0", 46),
    ] {
        answers_with(model, "iphone-17-pro", quant, layers, 8);
    }
}

/// Qwen3-Next: the preset's geometry is its synthesized file's, and the
/// 80B model answers on the phone with its 48 layers and top-10.
#[test]
fn qwen3_next_preset_matches_its_file() {
    preset_matches_its_file("small-qwen3-next", 8);
    answers_with("qwen3-next-80b", "iphone-17-pro", "q4_0", 48, 10);
}

/// gpt-oss: the preset's geometry is its synthesized file's, and the 120b
/// and 20b answer with their 36 and 24 layers and top-4, in the published
/// MXFP4 and in Q4_0.
#[test]
fn gpt_oss_presets_match_their_files() {
    preset_matches_its_file("small-gpt-oss", 4);
    for (model, layers) in [("gpt-oss-120b", 36), ("gpt-oss-20b", 24)] {
        for quant in ["mxfp4", "q4_0"] {
            answers_with(model, "iphone-17-pro", quant, layers, 4);
        }
    }
}

/// Llama 4: the preset's geometry is its synthesized file's, and Scout
/// and Maverick answer on the laptop with their 48 layers and top-1.
#[test]
fn llama4_presets_match_their_files() {
    preset_matches_its_file("small-llama4", 8);
    for model in ["llama4-scout", "llama4-maverick"] {
        answers_with(model, "macbook-pro-m3-max-48gb", "q2_k", 48, 1);
    }
}

/// `sim --model MODEL --device DEVICE --quant QUANT` answers within its
/// flash bound, with `layers` layers and the model's top-k.
fn answers_with(model: &str, device: &str, quant: &str, layers: usize, top_k: usize) {
    let j = json(&[
        "sim", "--model", model, "--device", device, "--quant", quant, "--tokens", "3", "--json",
    ]);
    let tps = j["tok_per_s"].as_f64().unwrap();
    assert!(tps > 0.0 && tps <= j["flash_bound_tok_per_s"].as_f64().unwrap() * 1.0001);
    assert_eq!(j["per_layer"].as_array().unwrap().len(), layers, "{model}");
    assert_eq!(j["top_k"], top_k, "{model}");
}

fn preset_matches_its_file(preset: &str, layers: usize) {
    let f = scratch(&format!("{preset}.gguf"));
    run_ok(&[
        "synth",
        "--preset",
        preset,
        "--quant",
        "q4",
        "-o",
        f.to_str().unwrap(),
        "--quiet",
    ]);
    let sim = |m: &str| {
        json(&[
            "sim", "--model", m, "--device", "dev-vm", "--tokens", "4", "--json",
        ])
    };
    let (file, from_preset) = (sim(f.to_str().unwrap()), sim(preset));
    std::fs::remove_file(&f).ok();
    for k in ["dense_bytes", "top_k"] {
        assert_eq!(file[k], from_preset[k], "{preset}: {k}");
    }
    assert_eq!(
        file["budget"]["kv"], from_preset["budget"]["kv"],
        "{preset}"
    );
    let (a, b) = (
        file["compute_s"].as_f64().unwrap(),
        from_preset["compute_s"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-9 * a, "{preset}: compute {a} vs {b}");
    assert_eq!(
        file["per_layer"].as_array().unwrap().len(),
        layers,
        "{preset}"
    );
}
