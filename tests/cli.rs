//! The `sluice` binary, driven as a user would: the happy paths, and bad
//! input that must end in one clear `error:` line and a non-zero exit.

mod common;

use common::*;
use std::path::PathBuf;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn generate_streams_text_and_is_deterministic() {
    let m = fixtures().join("models/qwen3_moe");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the river",
            "-n",
            "12",
            "--ignore-eos",
        ];
        a.extend_from_slice(extra);
        let (out, err) = run_ok(&a);
        assert!(err.contains("generated 12 tokens"), "{err}");
        out
    };
    let greedy = run(&[]);
    assert!(!greedy.trim().is_empty());
    assert_eq!(greedy, run(&[]), "greedy decoding must be deterministic");
    let sampled = run(&["--temperature", "1.5", "--seed", "3"]);
    assert_eq!(sampled, run(&["--temperature", "1.5", "--seed", "3"]));
}

#[test]
fn generate_with_token_ids_and_gguf_vocab() {
    let m = fixtures().join("models/qwen3_moe.q8_0.gguf");
    let m = m.to_str().unwrap();
    let ids = [
        "generate",
        "--model",
        m,
        "--tokens",
        "261,267,270",
        "-n",
        "5",
        "--ignore-eos",
    ];
    let (out, err) = run_ok(&ids);
    assert!(
        err.contains("prompt 3 tokens") && err.contains("generated 5 tokens"),
        "{err}"
    );
    // The GGUF carries its vocabulary: output is decoded text, not ids.
    assert!(
        !out.trim().split(',').all(|t| t.parse::<u32>().is_ok()),
        "{out:?}"
    );
    // A text prompt is encoded through that vocabulary.
    let (_, err) = run_ok(&["generate", "--model", m, "--prompt", "the river", "-n", "3"]);
    assert!(err.contains("prompt "), "{err}");
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    use sluice_engine::Tokenizer;
    use sluice_format::ModelFiles;
    let st = ModelFiles::open(fixtures().join("models/qwen3_moe")).unwrap();
    let gg = ModelFiles::open(fixtures().join("models/qwen3_moe.f16.gguf")).unwrap();
    let (a, b) = (
        Tokenizer::for_model(&st).unwrap().unwrap(),
        Tokenizer::for_model(&gg).unwrap().unwrap(),
    );
    for text in ["the river runs", "Hello, world! 123", "  spaces\nand lines"] {
        let ids = a.encode(text).unwrap();
        assert_eq!(ids, b.encode(text).unwrap(), "{text:?}");
        assert_eq!(a.decode(&ids).unwrap(), b.decode(&ids).unwrap());
    }
}

#[test]
fn inspect_reports_experts_and_bytes() {
    let m = fixtures().join("models/qwen2_moe.q4_0.gguf");
    let (out, _) = run_ok(&["inspect", m.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "qwen2_moe");
    assert_eq!(v["experts"], 8);
    assert_eq!(v["top_k"], 2);
    assert_eq!(v["shared_expert"], true);
    let (e, d, t) = (
        v["expert_bytes"].as_u64().unwrap(),
        v["dense_bytes"].as_u64().unwrap(),
        v["tensor_bytes"].as_u64().unwrap(),
    );
    assert_eq!(e + d, t);
    let moe_layers = v["moe_layers"].as_u64().unwrap();
    assert_eq!(e, v["bytes_per_expert"].as_u64().unwrap() * 8 * moe_layers);
    assert!(v["quant_types"]["Q4_0"]["tensors"].as_u64().unwrap() > 0);
    let share = v["expert_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0);
    // Human-readable form says the same.
    let (s, _) = run_ok(&["inspect", m.to_str().unwrap()]);
    assert!(
        s.contains("top-2 + shared expert") && s.contains("Q4_0"),
        "{s}"
    );
}

#[test]
fn missing_path_is_a_clear_error() {
    let e = fails(&["logits", "--model", "/nonexistent/model", "--tokens", "1"]);
    assert!(e.contains("/nonexistent/model"), "{e}");
}

#[test]
fn directory_without_config_is_a_clear_error() {
    let d = tmpdir("nocfg");
    let e = fails(&["inspect", d.to_str().unwrap()]);
    assert!(e.contains("no config.json"), "{e}");
}

/// A copy of the qwen3_moe fixture whose config.json has `from` replaced.
fn fixture_with_config_edit(tag: &str, from: &str, to: &str) -> PathBuf {
    fixture_edit(tag, "qwen3_moe", from, to)
}

/// A copy of fixture `src` (config.json and model.safetensors) with `from`
/// replaced by `to` in its config.
fn fixture_edit(tag: &str, src: &str, from: &str, to: &str) -> PathBuf {
    let d = tmpdir(tag);
    let src = fixtures().join("models").join(src);
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    assert!(cfg.contains(from), "fixture config has no {from}");
    std::fs::write(d.join("config.json"), cfg.replace(from, to)).unwrap();
    d
}

#[test]
fn unsupported_architecture_is_named() {
    let d = fixture_with_config_edit("arch", "\"qwen3_moe\"", "\"jamba\"");
    let e = fails(&["inspect", d.to_str().unwrap()]);
    assert!(e.contains("jamba") && e.contains("unsupported"), "{e}");
}

#[test]
fn token_outside_vocabulary_is_rejected() {
    let m = fixtures().join("models/mixtral");
    let e = fails(&[
        "logits",
        "--model",
        m.to_str().unwrap(),
        "--tokens",
        "1,999999",
    ]);
    assert!(e.contains("999999") && e.contains("vocabulary"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_clear_errors() {
    let d = tmpdir("corrupt");
    let gguf = std::fs::read(fixtures().join("models/qwen3_moe.f16.gguf")).unwrap();
    for (name, bytes) in [
        ("trunc.gguf", gguf[..gguf.len() / 2].to_vec()),
        ("header.gguf", gguf[..100].to_vec()),
        ("tiny.gguf", b"GG".to_vec()),
    ] {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = fails(&["inspect", p.to_str().unwrap()]);
        assert!(e.contains(name), "{e}");
    }
    // A safetensors header that lies about its length.
    let sd = d.join("st");
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::copy(
        fixtures().join("models/olmoe/config.json"),
        sd.join("config.json"),
    )
    .unwrap();
    let mut st = std::fs::read(fixtures().join("models/olmoe/model.safetensors")).unwrap();
    st[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(sd.join("model.safetensors"), st).unwrap();
    let e = fails(&["inspect", sd.to_str().unwrap()]);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrongly_shaped_tensor_names_the_tensor() {
    let d = fixture_with_config_edit("shape", "\"hidden_size\": 72", "\"hidden_size\": 80");
    let e = fails(&["inspect", d.to_str().unwrap()]);
    assert!(e.contains("embed_tokens") && e.contains("shape"), "{e}");
}

/// A config that contradicts the tensors is refused, naming both sides:
/// the experts' and the dense layers' sizes, experts and top-k, and layers
/// the file holds beyond the declared count (not silently dropped).
#[test]
fn config_that_contradicts_the_tensors_is_refused() {
    for (tag, from, to, want) in [
        (
            "moe-inter",
            "\"moe_intermediate_size\": 24",
            "\"moe_intermediate_size\": 30",
            ["moe_intermediate_size = 30", "24 rows"],
        ),
        (
            "inter",
            "\"intermediate_size\": 56",
            "\"intermediate_size\": 40",
            ["intermediate_size = 40", "56 rows"],
        ),
        (
            "layers",
            "\"num_hidden_layers\": 3",
            "\"num_hidden_layers\": 2",
            ["says 2 layers", "model.layers.2."],
        ),
        (
            "experts",
            "\"num_local_experts\": 10",
            "\"num_local_experts\": 6",
            ["mlp.gate.weight", "[6, 72]"],
        ),
        (
            "topk",
            "\"num_experts_per_tok\": 3",
            "\"num_experts_per_tok\": 20",
            ["top-k 20", "10 experts"],
        ),
        (
            "zero",
            "\"num_local_experts\": 10",
            "\"num_local_experts\": 0",
            ["expert count 0", "out of range"],
        ),
    ] {
        let d = fixture_with_config_edit(tag, from, to);
        let e = fails(&["inspect", d.to_str().unwrap()]);
        for w in want {
            assert!(e.contains(w), "{tag}: {w:?} in {e}");
        }
    }
}

/// A config that declares multi-token-prediction layers gets them skipped,
/// and the run says so.
#[test]
fn skipped_mtp_layers_are_announced() {
    let m = fixtures().join("models/deepseek_v3");
    let (_, err) = run_ok(&["logits", "--model", m.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(
        err.contains("declares 1 multi-token-prediction layer: skipped"),
        "{err}"
    );
    let q = fixtures().join("models/qwen3_moe");
    let (_, err) = run_ok(&["logits", "--model", q.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(!err.contains("multi-token"), "{err}");
}

/// DeepSeek-V3's own fields: router groups that do not divide the experts
/// or choose more groups than exist, latent ranks that contradict the
/// tensors, and a YaRN factor out of range are refused by name.
#[test]
fn llama4_config_that_contradicts_itself_or_the_tensors_is_refused() {
    for (tag, from, to, want) in [
        (
            "l4-rope",
            "\"high_freq_factor\": 4.0",
            "\"high_freq_factor\": 0.5",
            ["llama3 rope scaling", "high > low"],
        ),
        (
            "l4-chunk",
            "\"attention_chunk_size\": 4",
            "\"attention_chunk_size\": 0",
            ["attention_chunk_size", "positive"],
        ),
        (
            "l4-floor",
            "\"floor_scale\": 4",
            "\"floor_scale\": 0",
            ["floor_scale 0", "> 0"],
        ),
        (
            "l4-experts",
            "\"num_local_experts\": 4",
            "\"num_local_experts\": 5",
            [
                "gate_up_proj has shape [4, 64, 64]",
                "expected [5, cols, rows]",
            ],
        ),
    ] {
        let d = fixture_edit(tag, "llama4", from, to);
        let e = fails(&["inspect", d.to_str().unwrap()]);
        for w in want {
            assert!(e.contains(w), "{tag}: {w:?} in {e}");
        }
    }
}

/// gpt-oss's own fields: a SwiGLU limit that is not positive, experts
/// and widths that contradict the stacked tensors.
#[test]
fn gpt_oss_config_that_contradicts_itself_or_the_tensors_is_refused() {
    for (fixture, tag, from, to, want) in [
        (
            "gpt_oss",
            "oss-limit",
            "\"swiglu_limit\": 0.8",
            "\"swiglu_limit\": -1.0",
            &["clamped SwiGLU", "positive limit"][..],
        ),
        (
            "gpt_oss",
            "oss-experts",
            "\"num_local_experts\": 6",
            "\"num_local_experts\": 7",
            &[
                "gate_up_proj has shape [6, 64, 64]",
                "expected [7, cols, rows]",
            ][..],
        ),
        (
            "gpt_oss",
            "oss-inter",
            "\"intermediate_size\": 32",
            "\"intermediate_size\": 40",
            &["intermediate_size = 40", "32 rows"][..],
        ),
        // The MXFP4 layout's blocks and scales are checked too.
        (
            "gpt_oss_mxfp4",
            "oss-mxfp4-experts",
            "\"num_local_experts\": 6",
            "\"num_local_experts\": 7",
            &["MXFP4 expert tensors", "[7, rows, blocks, 16]"][..],
        ),
        (
            "gpt_oss_mxfp4",
            "oss-mxfp4-inter",
            "\"intermediate_size\": 32",
            "\"intermediate_size\": 40",
            &["intermediate_size = 40", "32 rows"][..],
        ),
    ] {
        let d = fixture_edit(tag, fixture, from, to);
        let e = fails(&["inspect", d.to_str().unwrap()]);
        for w in want {
            assert!(e.contains(w), "{tag}: {w:?} in {e}");
        }
    }
}

/// Block-scaled FP8 files whose tile size, scale grid or types contradict
/// each other are refused by name, as is packing FP8 into GGUF.
#[test]
fn fp8_that_contradicts_itself_is_refused() {
    let block = "\"weight_block_size\": [\n      16,\n      32\n    ]";
    for (tag, to, want) in [
        (
            "fp8-block",
            "\"weight_block_size\": [32, 32]",
            &[
                "gate_proj.weight_scale_inv have shape [3, 2]",
                "[48, 64] in tiles of 32x32 need [2, 2]",
            ][..],
        ),
        (
            "fp8-zero",
            "\"weight_block_size\": [0, 32]",
            &["block_structure) is [0,32]", "positive integers"][..],
        ),
        (
            "fp8-one",
            "\"weight_block_size\": [16]",
            &["block_structure) is [16]"][..],
        ),
    ] {
        let d = fixture_edit(tag, "deepseek_v3_fp8", block, to);
        let e = fails(&["inspect", d.to_str().unwrap()]);
        for w in want {
            assert!(e.contains(w), "{tag}: {w:?} in {e}");
        }
    }
    // Types in the safetensors header, swapped for names of the same length.
    for (tag, from, to, want) in [
        (
            "fp8-e5m2",
            "\"F8_E4M3\"",
            "\"F8_E5M2\"",
            "values are F8_E5M2, expected F8_E4M3",
        ),
        (
            "fp8-scales",
            "\"F32\",\"shape\":[4,2]",
            "\"I32\",\"shape\":[4,2]",
            "of type I32",
        ),
        (
            "fp8-noscale",
            "gate_proj.weight_scale_inv",
            "gate_proj.weight_scale_ivn",
            "is F8_E4M3 without a",
        ),
    ] {
        let d = fixture_edit(tag, "deepseek_v3_fp8", block, block);
        let p = d.join("model.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let head = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
        assert!(head.contains(from), "{tag}: no {from} in the header");
        let i = head.find(from).unwrap();
        b[8 + i..8 + i + to.len()].copy_from_slice(to.as_bytes());
        std::fs::write(&p, b).unwrap();
        let e = fails(&["inspect", d.to_str().unwrap()]);
        assert!(e.contains(want), "{tag}: {want:?} in {e}");
    }
    let m = fixtures().join("models/deepseek_v3_fp8");
    let out = tmpdir("fp8-pack").join("m.gguf");
    let e = fails(&[
        "pack",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(e.contains("no block-scaled FP8 type"), "{e}");
    // MLX's scales and biases have no GGUF type either.
    let m = fixtures().join("models/qwen3_5_moe_mlx");
    let e = fails(&[
        "pack",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(e.contains("GGUF has no MLX types"), "{e}");
}

/// Llama 4's and gpt-oss's safetensors store experts transposed: they are
/// rearranged in memory for a resident run, and streaming them is refused
/// by name (the packed file streams).
#[test]
fn transposed_experts_are_not_streamed_but_pack() {
    for name in ["llama4", "gpt_oss", "gpt_oss_mxfp4"] {
        let m = fixtures().join("models").join(name);
        let e = fails(&[
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--ram-cap",
            "1G",
        ]);
        assert!(
            e.contains("transposed") && e.contains("GGUF"),
            "{name}: {e}"
        );
    }
}

#[test]
fn deepseek_config_that_contradicts_the_tensors_is_refused() {
    for (tag, from, to, want) in [
        (
            "ds-groups",
            "\"n_group\": 4",
            "\"n_group\": 3",
            ["3 groups over 8 experts", "dividing"],
        ),
        (
            "ds-topk-group",
            "\"topk_group\": 2",
            "\"topk_group\": 5",
            ["5 of 4 groups", "chosen <= groups"],
        ),
        (
            "ds-kv-lora",
            "\"kv_lora_rank\": 32",
            "\"kv_lora_rank\": 16",
            ["kv_b_proj.weight has shape [112, 32]", "kv_lora_rank 16"],
        ),
        (
            "ds-rope",
            "\"qk_rope_head_dim\": 8",
            "\"qk_rope_head_dim\": 4",
            ["q_b_proj.weight has shape [96, 24]", "qk_rope_head_dim 4"],
        ),
        (
            "ds-yarn",
            "\"factor\": 4.0",
            "\"factor\": -1.0",
            ["YaRN", "factor -1"],
        ),
    ] {
        let d = fixture_edit(tag, "deepseek_v3", from, to);
        let e = fails(&["inspect", d.to_str().unwrap()]);
        for w in want {
            assert!(e.contains(w), "{tag}: {w:?} in {e}");
        }
    }
}

/// `--experts-k`: the config's top-k is the default (passing it changes
/// nothing), another value changes the logits and is announced, and an
/// impossible one is refused.
#[test]
fn experts_k_defaults_to_the_config_and_is_announced() {
    let m = fixtures().join("models/qwen3_5_moe");
    let m = m.to_str().unwrap();
    let base = ["logits", "--model", m, "--tokens", "261,267,270,276,262"];
    let (plain, plain_err) = run_ok(&base);
    assert!(!plain_err.contains("experts-k"), "{plain_err}");
    let top_k = {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{m}/config.json")).unwrap())
                .unwrap();
        c["num_experts_per_tok"].as_u64().unwrap().to_string()
    };
    let (same, _) = run_ok(&[&base[..], &["--experts-k", &top_k]].concat());
    assert_eq!(
        same, plain,
        "--experts-k at the config's value changed the output"
    );
    for io in [&[][..], &["--io", "pread", "--cache-slots", "3"][..]] {
        let (more, err) = run_ok(&[&base[..], &["--experts-k", "4"], io].concat());
        assert_ne!(more, plain, "--experts-k 4 did not change the output");
        assert!(
            err.contains("--experts-k 4") && err.contains("instead of the model's 2"),
            "{err}"
        );
    }
    let e = fails(&[&base[..], &["--experts-k", "9"]].concat());
    assert!(
        e.contains("--experts-k 9") && e.contains("8 experts"),
        "{e}"
    );
}

/// An MLX file whose config does not match its tensors, or lies about the
/// linear-attention shape, is refused with the tensor or setting named.
#[test]
fn inconsistent_mlx_and_qwen35_files_are_named() {
    // The base width says 8 bits where the files hold 4-bit rows.
    let d = fixture_edit(
        "mlx-bits",
        "qwen3_5_moe_mlx",
        "\"bits\": 4,",
        "\"bits\": 8,",
    );
    let e = fails(&["inspect", d.to_str().unwrap()]);
    assert!(e.contains("MLX-quantized") && e.contains("scales"), "{e}");
    // No quantization section at all.
    let d = fixture_edit(
        "mlx-noq",
        "qwen3_5_moe_mlx",
        "\"quantization\"",
        "\"not_quantization\"",
    );
    let d2 = d.join("config.json");
    let cfg = std::fs::read_to_string(&d2).unwrap();
    std::fs::write(&d2, cfg.replace("\"quantization_config\"", "\"other\"")).unwrap();
    let e = fails(&["inspect", d.to_str().unwrap()]);
    assert!(e.contains("quantization"), "{e}");
    // Value heads that are not a multiple of the key heads.
    let d = fixture_edit(
        "q35-heads",
        "qwen3_5_moe",
        "\"linear_num_value_heads\": 4",
        "\"linear_num_value_heads\": 3",
    );
    let e = fails(&["inspect", d.to_str().unwrap()]);
    assert!(e.contains("value heads"), "{e}");
}

/// A GGUF header claiming 50 million layers is refused before any
/// per-layer work (found by `cargo fuzz run gguf_model`: the refusal came
/// after 50 million tensor-name lookups, four seconds later).
#[test]
fn absurd_layer_count_is_refused_before_per_layer_work() {
    let src = fixtures().join("models/qwen2_moe.q4_0.gguf");
    let mut b = std::fs::read(&src).unwrap();
    let key = b"qwen2moe.block_count";
    let at = b
        .windows(key.len())
        .position(|w| w == key)
        .expect("block_count key")
        + key.len();
    // u32 type tag (4), then the value.
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 4);
    b[at + 4..at + 8].copy_from_slice(&50_000_000u32.to_le_bytes());
    let p = tmpdir("layers").join("layers.gguf");
    std::fs::write(&p, b).unwrap();
    let t = std::time::Instant::now();
    let e = fails(&["inspect", p.to_str().unwrap()]);
    assert!(e.contains("layer count 50000000"), "{e}");
    // Generous: the refusal takes milliseconds; per-layer work took seconds.
    assert!(t.elapsed().as_secs_f64() < 2.0, "took {:?}", t.elapsed());
}

/// A GGUF tensor of a type sluice does not read (IQ2_XXS, id 16) or of no
/// known type is named with its type id; an unknown `--quant` or
/// `--expert-quant` name is named too.
#[test]
fn unsupported_quant_types_are_named() {
    let mut b = std::fs::read(fixtures().join("models/qwen3_moe.q8_0.gguf")).unwrap();
    let name = b"blk.0.ffn_down_exps.weight";
    // The tensor record: name, then n_dims (u32), the dims (u64 each), the type (u32).
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    assert_eq!(
        u32::from_le_bytes(b[ty..ty + 4].try_into().unwrap()),
        8,
        "Q8_0"
    );
    let d = tmpdir("quant");
    for id in [16u32, 99] {
        b[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        let p = d.join(format!("type{id}.gguf"));
        std::fs::write(&p, &b).unwrap();
        let e = fails(&["inspect", p.to_str().unwrap()]);
        assert!(
            e.contains("blk.0.ffn_down_exps.weight")
                && e.contains(&format!("unsupported tensor type id {id}")),
            "{e}"
        );
    }
    let out = d.join("x.gguf");
    let e = fails(&[
        "synth",
        "--preset",
        "small-moe",
        "--quant",
        "q9",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("unknown quant type \"q9\""), "{e}");
    assert!(!out.exists(), "a refused synth wrote {}", out.display());
    let m = fixtures().join("models/qwen3_moe");
    let e = fails(&[
        "pack",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--expert-quant",
        "iq2",
    ]);
    assert!(e.contains("unknown quant type \"iq2\""), "{e}");
}

/// A cap below dense weights + one layer's experts is refused before any
/// weight is read, with the figures that make up the shortfall.
#[test]
fn cap_too_small_is_refused_with_the_figures() {
    let m = fixtures().join("models/qwen3_moe");
    for io in ["uring", "pread"] {
        let e = fails(&[
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--tokens",
            "1",
            "--ram-cap",
            "1M",
            "--io",
            io,
        ]);
        assert!(
            e.contains("--ram-cap 1.00M is too small")
                && e.contains("dense weights")
                && e.contains("need at least"),
            "{e}"
        );
    }
}

/// `--replay` maps another geometry explicitly (and says how), but a trace
/// with nothing to replay (no token, or no expert chosen at any layer) is
/// refused naming the file, instead of silently leaving the router in
/// charge.
#[test]
fn replay_trace_that_cannot_map_is_refused() {
    let m = fixtures().join("models/qwen3_moe");
    let m = m.to_str().unwrap();
    let d = tmpdir("replay");
    for (name, doc, why) in [
        (
            "empty.json",
            r#"{"meta":{"num_layers":2,"num_experts":4,"top_k":2},"routes":[]}"#,
            "no routes",
        ),
        (
            "unrouted.json",
            r#"{"meta":{"num_layers":2,"num_experts":4,"top_k":2},"routes":[{"layers":{}}]}"#,
            "chooses an expert",
        ),
        (
            "beyond.json",
            r#"{"meta":{"num_layers":2,"num_experts":4,"top_k":2},"routes":[{"layers":{"5":{"experts":[1]}}}]}"#,
            "not below 2",
        ),
    ] {
        let p = d.join(name);
        std::fs::write(&p, doc).unwrap();
        let e = fails(&[
            "logits",
            "--model",
            m,
            "--tokens",
            "1,2",
            "--replay",
            p.to_str().unwrap(),
        ]);
        assert!(
            e.contains("--replay") && e.contains(name) && e.contains(why),
            "{e}"
        );
    }
    // More layers and experts than the model: mapped, and the mapping said.
    let p = d.join("big.json");
    std::fs::write(
        &p,
        r#"{"meta":{"model_id":"big","num_layers":64,"num_experts":256,"top_k":8},"routes":[{"layers":{"60":{"experts":[200,201,202,203,204,205,206,207]}}}]}"#,
    )
    .unwrap();
    let (_, err) = run_ok(&[
        "logits",
        "--model",
        m,
        "--tokens",
        "1,2",
        "--replay",
        p.to_str().unwrap(),
    ]);
    assert!(
        err.contains("1 MoE layers × 256 experts") && err.contains("expert e → e mod"),
        "{err}"
    );
}
