//! Streaming through the CLI: bit-identical logits under a cap that forces
//! misses, the packed layout and its checksums, and a peak RSS that stays
//! under the cap while a model several times its size streams.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const TOKENS: &str = "261,267,270,276,262,274,16,262,269,277,262,275,3";

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("streaming");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn logits(model: &Path, extra: &[&str]) -> String {
    let m = model.to_str().unwrap();
    let mut args = vec!["logits", "--model", m, "--tokens", TOKENS];
    args.extend_from_slice(extra);
    run_ok(&args).0
}

/// One slot forces a miss in every MoE layer for every token (top-k ≥ 2),
/// and the logits stay bit-identical to the resident run, for every
/// container and both engines.
#[test]
fn streamed_logits_are_bit_identical_to_resident() {
    for f in [
        "qwen3_moe",
        "qwen2_moe_sharded",
        "qwen2_moe.q4_0.gguf",
        "mixtral.f16.gguf",
        "olmoe.bf16.gguf",
        "qwen3_5_moe",
        "qwen3_5_moe_mlx",
        "qwen3_5_moe.q8_0.gguf",
        "deepseek_v3",
        // FP8 experts streamed in place: codes and scale grids, two ranges each
        "deepseek_v3_fp8",
        "glm4_moe_fp8",
        // stacked FP8 experts whose up half starts mid-tile, E8M0 scales
        "qwen3_moe_fp8",
        // compressed-tensors' per-channel FP8 scales
        "glm4_moe_fp8_channel",
        // stacked experts and quantized absorbed-MLA tensors as llama.cpp converts them
        "llamacpp/deepseek_v3.q8_0.gguf",
        "glm4_moe",
        "llamacpp/glm4_moe.q8_0.gguf",
        // Qwen3-Next's fused DeltaNet inputs, and llama.cpp's split of them
        "qwen3_next",
        "llamacpp/qwen3_next.q8_0.gguf",
        // mlx-community's Qwen3-Next layout: stacked switch_mlp experts, 4-bit
        "qwen3_next_mlx",
        "llamacpp/llama4.q8_0.gguf",
        // gpt-oss's resident expert biases beside streamed experts
        "llamacpp/gpt_oss.q8_0.gguf",
        // MXFP4 expert records
        "llamacpp/gpt_oss_mxfp4.q8_0.gguf",
    ] {
        let m = match f.split_once('/') {
            Some((dir, file)) => fixtures().join(dir).join(file),
            None => fixtures().join("models").join(f),
        };
        let resident = logits(&m, &[]);
        for io in ["uring", "pread"] {
            for slots in ["1", "3"] {
                for pf in ["none", "gate", "xlayer", "history", "token"] {
                    let s = logits(&m, &["--io", io, "--cache-slots", slots, "--prefetch", pf]);
                    assert!(
                        s == resident,
                        "{f}: --io {io} with {slots} slots, prefetch {pf} changed the logits"
                    );
                }
            }
        }
        let deep = logits(
            &m,
            &[
                "--io",
                "uring",
                "--cache-slots",
                "4",
                "--prefetch",
                "gate",
                "--prefetch-depth",
                "3",
            ],
        );
        assert!(
            deep == resident,
            "{f}: prefetching 3 layers ahead changed the logits"
        );
        let capped = logits(&m, &["--ram-cap", "256M", "--io", "pread", "--buffered"]);
        assert!(capped == resident, "{f}: buffered pread changed the logits");
    }
}

#[test]
fn packed_model_matches_source_and_checks_records() {
    let src = fixtures().join("models").join("qwen2_moe.q4_0.gguf");
    let out = scratch("qwen2_moe.packed.gguf");
    let o = out.to_str().unwrap();
    run_ok(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        o,
        "--align",
        "16K",
        "--quiet",
    ]);
    let want = logits(&src, &[]);
    assert!(logits(&out, &[]) == want, "packing changed the logits");
    assert!(
        logits(&out, &["--io", "uring", "--cache-slots", "2", "--verify"]) == want,
        "streaming the packed file changed the logits"
    );
    // Records start on 16 KiB boundaries and hold gate, up, down back to
    // back, each padded to the file's alignment (the GGUF rule llama.cpp
    // enforces); `--verify` above read each as one record.
    let g = sluice_format::ModelFiles::open(&out).unwrap();
    let layer = (0..8)
        .find(|l| g.tensor(&format!("blk.{l}.ffn_gate.3.weight")).is_some())
        .unwrap();
    let t = |n: &str| g.tensor(&format!("blk.{layer}.ffn_{n}.3.weight")).unwrap();
    let (gate, up, down) = (t("gate"), t("up"), t("down"));
    assert_eq!(gate.offset % 16384, 0);
    assert_eq!(
        up.offset,
        (gate.offset + gate.nbytes).next_multiple_of(16384)
    );
    assert_eq!(down.offset, (up.offset + up.nbytes).next_multiple_of(16384));
    // Flip one byte in every record of that layer (whichever expert the
    // router picks first is corrupt): --verify names the layer and expert.
    let mut bytes = std::fs::read(&out).unwrap();
    for e in 0.. {
        let Some(u) = g.tensor(&format!("blk.{layer}.ffn_up.{e}.weight")) else {
            break;
        };
        bytes[(u.offset + 5) as usize] ^= 0x40;
    }
    let bad = scratch("qwen2_moe.corrupt.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let b = bad.to_str().unwrap();
    let err = fails(&[
        "logits",
        "--model",
        b,
        "--tokens",
        TOKENS,
        "--io",
        "pread",
        "--cache-slots",
        "16",
        "--verify",
    ]);
    assert!(
        err.contains(&format!("checksum mismatch in layer {layer} expert "))
            && err.contains("qwen2_moe.corrupt.gguf"),
        "{err}"
    );
    // --verify on a model without checksums is refused up front.
    let err = fails(&[
        "logits",
        "--model",
        src.to_str().unwrap(),
        "--tokens",
        "1",
        "--io",
        "uring",
        "--verify",
    ]);
    assert!(err.contains("packed"), "{err}");
}

/// DeepSeek-V3's latent attention, selection bias and shared experts
/// survive packing (llama.cpp's `deepseek2` tensor names), GLM-4.5's
/// biases and q/k norms too (`glm4moe`), Llama 4's experts (transposed in
/// its safetensors) and rope scaling as well, and the packed files stream
/// to the same logits.
#[test]
fn sigmoid_router_models_pack_and_stream() {
    for (name, tensors) in [
        (
            "deepseek_v3",
            &[
                "blk.0.attn_kv_a_mqa.weight",
                "blk.0.attn_kv_b.weight",
                "blk.2.exp_probs_b.bias",
                "blk.2.ffn_up_shexp.weight",
            ][..],
        ),
        (
            "deepseek_v3_lite",
            &[
                "blk.0.attn_kv_a_mqa.weight",
                "blk.2.exp_probs_b.bias",
                "blk.2.ffn_up_shexp.weight",
            ][..],
        ),
        (
            "glm4_moe",
            &[
                "blk.0.attn_q.bias",
                "blk.0.attn_k_norm.weight",
                "blk.1.post_attention_norm.weight",
                "blk.2.exp_probs_b.bias",
                "blk.2.ffn_up_shexp.weight",
            ][..],
        ),
        // Llama 4's transposed experts, rearranged at load, written as
        // records; its rope scaling as llama.cpp's rope_freqs.
        (
            "llama4",
            &[
                "rope_freqs.weight",
                "blk.1.ffn_up_shexp.weight",
                "blk.0.ffn_gate.weight",
            ][..],
        ),
        // gpt-oss's interleaved transposed experts as records, their
        // biases, the router's and the sinks resident.
        (
            "gpt_oss",
            &[
                "blk.0.attn_sinks.weight",
                "blk.0.attn_output.bias",
                "blk.1.ffn_gate_inp.bias",
                "blk.1.ffn_down_exps.bias",
                "blk.1.post_attention_norm.weight",
                "blk.0.ffn_up.3.weight",
            ][..],
        ),
        // gpt-oss's MXFP4 safetensors, repacked at load, written as MXFP4
        // records.
        (
            "gpt_oss_mxfp4",
            &["blk.0.attn_sinks.weight", "blk.1.ffn_down.2.weight"][..],
        ),
    ] {
        pack_and_stream(name, tensors, "2");
    }
}

/// Packs fixture `name`, checks the packed file gives the source's logits
/// resident and streamed through `slots` slots with record checksums, and
/// holds `tensors`.
fn pack_and_stream(name: &str, tensors: &[&str], slots: &str) {
    let src = fixtures().join("models").join(name);
    let out = scratch(&format!("{name}.packed.gguf"));
    let o = out.to_str().unwrap();
    run_ok(&["pack", src.to_str().unwrap(), "-o", o, "--quiet"]);
    let want = logits(&src, &[]);
    assert!(
        logits(&out, &[]) == want,
        "{name}: packing changed the logits"
    );
    assert!(
        logits(&out, &["--cache-slots", slots, "--verify"]) == want,
        "{name}: streaming the packed file changed the logits"
    );
    let g = sluice_format::ModelFiles::open(&out).unwrap();
    for n in tensors {
        assert!(
            g.tensor(n).is_some(),
            "{name}: {n} missing from the packed file"
        );
    }
}

/// Qwen3.5 and Qwen3-Next: the packed file stores the linear-attention
/// tensors under llama.cpp's names (Qwen3-Next's fused inputs as its
/// `ssm_in` and `ssm_ba`) and the zero-centred norms as `1 + w`, and reads
/// back to the same logits; MLX files are refused by name (GGUF has no MLX
/// types) instead of being converted silently.
#[test]
fn qwen35_packs_and_mlx_pack_is_refused() {
    for (name, tensors) in [
        (
            "qwen3_5_moe_vl",
            &[
                "blk.0.attn_qkv.weight",
                "blk.0.ssm_a",
                "blk.3.attn_q.weight",
            ][..],
        ),
        (
            "qwen3_next",
            &[
                "blk.0.ssm_in.weight",
                "blk.0.ssm_ba.weight",
                "blk.3.attn_q.weight",
                "blk.2.ffn_gate.weight",
            ][..],
        ),
    ] {
        pack_and_stream(name, tensors, "3");
    }
    let mlx = fixtures().join("models").join("qwen3_5_moe_mlx");
    let err = fails(&[
        "pack",
        mlx.to_str().unwrap(),
        "-o",
        scratch("mlx.gguf").to_str().unwrap(),
    ]);
    assert!(err.contains("MLX"), "{err}");
}

#[test]
fn requantized_pack_is_announced_and_close() {
    let src = fixtures().join("models").join("qwen3_moe");
    let out = scratch("qwen3_moe.q8.gguf");
    let r = sluice()
        .args(["pack", src.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--expert-quant", "bf16", "--quiet"])
        .output()
        .unwrap();
    assert!(r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("re-quantized"));
    let parse = |s: String| -> Vec<f32> {
        let j: serde_json::Value = serde_json::from_str(&s).unwrap();
        j["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect()
    };
    let a = parse(logits(&src, &[]));
    let b = parse(logits(&out, &[]));
    let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err > 0.0, "re-quantization changed nothing");
    assert!(
        err < 0.05 * max,
        "Q8_0 experts moved logits by {err} (max {max})"
    );
}

/// The honest cap: a synthetic model over four times the cap streams with
/// O_DIRECT, and the process's peak RSS (VmHWM) stays under the cap.
#[test]
fn peak_rss_stays_under_the_cap() {
    let out = scratch("small-moe.gguf");
    let o = out.to_str().unwrap();
    run_ok(&[
        "synth",
        "--preset",
        "small-moe",
        "--quant",
        "q8",
        "-o",
        o,
        "--quiet",
    ]);
    let size = std::fs::metadata(&out).unwrap().len();
    let cap: u64 = 96 << 20;
    assert!(size > 4 * cap, "model {size} is not over 4x the cap");
    let (stdout, _) = run_ok(&[
        "bench",
        "--model",
        o,
        "--ram-cap",
        "96M",
        "--io",
        "uring",
        "--tokens",
        "6",
        "--prompt-tokens",
        "3",
        "--probe-seconds",
        "0.2",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for k in [
        "tok_per_s",
        "ttft_s",
        "bytes_read_per_token",
        "hit_rate",
        "read_gbps",
        "probe_gbps",
        "stall_s",
        "compute_s",
        "peak_rss_bytes",
        "ram_cap_bytes",
        "io_engine",
        "capped",
    ] {
        assert!(j.get(k).is_some(), "bench JSON lacks {k}: {j}");
    }
    let peak = j["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= cap, "peak RSS {peak} > cap {cap}");
    assert_eq!(j["ram_cap_bytes"].as_u64(), Some(cap));
    assert_eq!(j["capped"], true);
    assert_eq!(j["io_engine"], "uring");
    let hit = j["hit_rate"].as_f64().unwrap();
    assert!(hit < 1.0, "everything hit: the cap did not bind");
    assert!(j["bytes_read_per_token"].as_f64().unwrap() > 0.0);
    assert!(j["probe_gbps"].as_f64().unwrap() > 0.0);
    assert!(j["warm"]["tok_per_s"].as_f64().unwrap() > 0.0);
    // Prefetch figures, and a prompt that reads each expert it needs once.
    for k in [
        "prefetch_recall",
        "prefetch_precision",
        "all_k_ready_rate",
        "wasted_prefetch_bytes_per_token",
        "cancelled_prefetches_per_token",
        "overlap_ratio",
        "predictor_s_per_token",
    ] {
        assert!(j[k].as_f64().is_some(), "bench JSON lacks {k}: {j}");
    }
    let read = j["prefill_bytes_read"].as_u64().unwrap();
    let distinct = j["prefill_distinct_expert_bytes"].as_u64().unwrap();
    assert!(
        read > 0 && read <= distinct,
        "prompt read {read} bytes for {distinct} of experts"
    );

    // The page-cache baseline says it was not capped (no memory cgroup).
    let (stdout, _) = run_ok(&[
        "bench",
        "--model",
        o,
        "--ram-cap",
        "96M",
        "--io",
        "mmap",
        "--tokens",
        "2",
        "--prompt-tokens",
        "2",
        "--probe-seconds",
        "0.1",
        "--json",
        "--no-warm",
    ]);
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let limited = sluice_io::sys::memory_cgroup_limit().is_some_and(|l| l <= cap);
    assert_eq!(j["capped"], limited, "{j}");
    assert_eq!(j["io_engine"], "mmap");

    // A cap below dense weights + one layer's experts is refused up front.
    let err = fails(&["bench", "--model", o, "--ram-cap", "12M", "--tokens", "1"]);
    assert!(err.contains("too small"), "{err}");
}

#[test]
fn bad_streaming_options_are_refused() {
    let m = fixtures().join("models").join("qwen3_moe");
    let m = m.to_str().unwrap();
    let err = fails(&["logits", "--model", m, "--tokens", "1", "--ram-cap", "12Q"]);
    assert!(err.contains("unit"), "{err}");
    let err = fails(&["logits", "--model", m, "--tokens", "1", "--io", "floppy"]);
    assert!(err.contains("floppy"), "{err}");
    let err = fails(&[
        "logits",
        "--model",
        m,
        "--tokens",
        "1",
        "--io",
        "uring",
        "--cache-policy",
        "fifo",
    ]);
    assert!(err.contains("fifo"), "{err}");
    let err = fails(&["synth", "--preset", "gpt-5", "-o", "/nonexistent/x"]);
    assert!(err.contains("unknown preset"), "{err}");
}

/// `synth --preset small-qwen3.5`, `small-qwen3-next` and `small-llama4`:
/// Gated DeltaNet and gated attention layers with a shared expert (and
/// Llama 4's interleaved layers, input-scaled routing and rope scaling),
/// written in the packed layout, stream with the same logits as the
/// resident run; the full-size 397B preset has the published per-expert
/// size.
#[test]
fn synthetic_qwen35_streams_bit_identically() {
    for (preset, arch) in [
        ("small-qwen3.5", "qwen3_5_moe"),
        ("small-qwen3-next", "qwen3_next"),
        ("small-llama4", "llama4_text"),
        ("small-gpt-oss", "gpt_oss"),
    ] {
        let out = scratch(&format!("{preset}.gguf"));
        let o = out.to_str().unwrap();
        run_ok(&[
            "synth", "--preset", preset, "--layers", "4", "--quant", "q8", "-o", o, "--quiet",
        ]);
        let (inspect, _) = run_ok(&["inspect", o]);
        assert!(inspect.contains(arch), "{inspect}");
        let resident = logits(&out, &[]);
        for pf in ["none", "gate", "xlayer"] {
            let s = logits(
                &out,
                &["--io", "uring", "--cache-slots", "6", "--prefetch", pf],
            );
            assert!(s == resident, "{preset}: prefetch {pf} changed the logits");
        }
    }
    let p = sluice_engine::synth::preset("qwen3.5-397b-a17b").unwrap();
    let c = p.config(p.layers());
    let linear = c
        .mixers
        .iter()
        .filter(|m| **m == sluice_engine::config::Mixer::Linear)
        .count();
    assert_eq!(
        (c.n_layers, linear, c.n_experts, c.top_k),
        (60, 45, 512, 10)
    );
    let q4 = sluice_core::DType::Q4_0;
    let expert = 3 * q4.tensor_bytes(&[p.expert_inter(), c.hidden]).unwrap();
    assert!((expert as f64 / 1e6 - 7.08).abs() < 0.01, "{expert}");
}
