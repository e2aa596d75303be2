//! Files sluice writes are GGUF files other engines load: the layout rules
//! llama.cpp's reader enforces (alignment, contiguous tensors), its
//! hyper-parameter keys with the values sluice reads back, and a
//! vocabulary. (Loading them in llama.cpp itself is recorded in
//! docs/BENCHMARKS.md; llama.cpp is not part of CI.)

mod common;

use common::*;
use sluice_engine::Model;
use sluice_format::gguf::{self, llama_cpp_layout_errors};
use sluice_format::Value;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-gguf-compat-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn header(p: &Path) -> gguf::Gguf {
    gguf::parse(&std::fs::read(p).unwrap()).unwrap()
}

fn u(g: &gguf::Gguf, k: &str) -> u64 {
    g.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("missing {k}"))
}

/// The keys llama.cpp needs for every architecture sluice writes, and the
/// vocabulary, agree with the model sluice opens from the same file.
fn check_keys(p: &Path) {
    let g = header(p);
    assert_eq!(
        llama_cpp_layout_errors(&g),
        Vec::<String>::new(),
        "{}",
        p.display()
    );
    let m = Model::open(p).unwrap();
    let c = &m.config;
    let a = g.architecture().unwrap().to_string();
    assert_eq!(u(&g, &format!("{a}.block_count")) as usize, c.n_layers);
    assert_eq!(u(&g, &format!("{a}.embedding_length")) as usize, c.hidden);
    assert_eq!(
        u(&g, &format!("{a}.attention.head_count")) as usize,
        c.n_heads
    );
    // llama.cpp keeps latent attention as one key/value head (the cache).
    let kv_heads = if c.mla.is_some() { 1 } else { c.n_kv_heads };
    assert_eq!(
        u(&g, &format!("{a}.attention.head_count_kv")) as usize,
        kv_heads
    );
    assert_eq!(u(&g, &format!("{a}.expert_count")) as usize, c.n_experts);
    assert_eq!(u(&g, &format!("{a}.expert_used_count")) as usize, c.top_k);
    assert!(u(&g, &format!("{a}.context_length")) > 0);
    assert!(u(&g, &format!("{a}.expert_feed_forward_length")) > 0);
    let eps = g
        .get(&format!("{a}.attention.layer_norm_rms_epsilon"))
        .and_then(Value::as_f64)
        .unwrap();
    assert!((eps as f32 - c.rms_eps).abs() <= c.rms_eps * 1e-6);
    let toks = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .expect("a vocabulary");
    assert_eq!(toks.len(), c.vocab, "{}", p.display());
    assert!(g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .is_some());
    // The header alone describes the model too: dropping sluice's own
    // config must give the same shape.
    let from_keys = sluice_engine::config::Config::from_gguf(&g, &m.files).unwrap();
    assert_eq!(from_keys.n_layers, c.n_layers);
    assert_eq!(from_keys.head_dim, c.head_dim);
    assert_eq!(from_keys.rot_dim, c.rot_dim);
    assert_eq!(from_keys.mixers, c.mixers);
    assert_eq!(from_keys.n_kv_heads, c.n_kv_heads);
    assert_eq!(from_keys.moe_layers, c.moe_layers);
    assert_eq!(from_keys.mla, c.mla);
    assert_eq!(from_keys.routing, c.routing);
    assert_eq!(from_keys.rope_style, c.rope_style);
    assert_eq!(from_keys.llama4, c.llama4);
    assert_eq!(from_keys.rope_factors, c.rope_factors);
    assert_eq!(from_keys.norm_topk_prob, c.norm_topk_prob);
    assert_eq!(from_keys.yarn, c.yarn);
    assert_eq!(from_keys.windows, c.windows);
    assert_eq!(from_keys.swiglu, c.swiglu);
    match (from_keys.attn_scale, c.attn_scale) {
        (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-6 * y, "{x} vs {y}"),
        (x, y) => assert_eq!(x, y),
    }
}

#[test]
fn synth_writes_files_llama_cpp_accepts_in_both_layouts() {
    for (preset, extra) in [
        ("small-moe", &[][..]),
        ("small-moe", &["--stacked"][..]),
        ("small-qwen3.5", &["--stacked"][..]),
        ("small-qwen3.5", &["--align", "16K"][..]),
        ("small-deepseek", &[][..]),
        ("small-deepseek", &["--stacked"][..]),
        ("small-glm", &["--stacked"][..]),
        ("small-qwen3-next", &["--stacked"][..]),
        ("small-llama4", &["--stacked"][..]),
        ("small-llama4", &[][..]),
        ("small-gpt-oss", &["--stacked"][..]),
        ("small-gpt-oss", &[][..]),
    ] {
        let out = scratch(&format!("{preset}{}.gguf", extra.join("")));
        let o = out.to_str().unwrap();
        let mut args = vec![
            "synth", "--preset", preset, "--layers", "4", "-o", o, "--quiet",
        ];
        args.extend_from_slice(extra);
        run_ok(&args);
        check_keys(&out);
        let g = header(&out);
        if extra.contains(&"--align") {
            assert_eq!(g.alignment, 16 << 10);
        }
        // Records start on the alignment: one aligned read each.
        for t in g.tensors.iter().filter(|t| t.name.contains("ffn_gate.")) {
            assert_eq!(t.offset % g.alignment, 0, "{}", t.name);
        }
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn pack_keeps_the_vocabulary_and_the_layout_rules() {
    // A GGUF source: its vocabulary is copied; a safetensors source with a
    // byte-level BPE tokenizer.json: converted.
    for (src, stacked) in [
        ("qwen2_moe.q4_0.gguf", false),
        ("qwen3_moe", false),
        ("qwen3_5_moe.q8_0.gguf", false),
        ("qwen3_moe", true),
        ("qwen3_5_moe.q8_0.gguf", true),
    ] {
        let s = fixtures().join("models").join(src);
        let out = scratch(&format!("{src}.{stacked}.packed.gguf"));
        let o = out.to_str().unwrap();
        let mut args = vec!["pack", s.to_str().unwrap(), "-o", o, "--quiet"];
        if stacked {
            args.push("--stacked");
        }
        run_ok(&args);
        check_keys(&out);
        // The stacked layout holds llama.cpp's tensor names.
        let names: Vec<String> = header(&out)
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .collect();
        assert_eq!(
            names.iter().any(|n| n.ends_with("ffn_gate_exps.weight")),
            stacked,
            "{src}"
        );
        // The packed file and its source give the same logits.
        let toks = "5,17,250,3,99";
        let a = run_ok(&["logits", "--model", s.to_str().unwrap(), "--tokens", toks]).0;
        let b = run_ok(&["logits", "--model", o, "--tokens", toks]).0;
        assert_eq!(a, b, "{src}");
        std::fs::remove_file(&out).unwrap();
    }
    // A GGUF-copied vocabulary tokenizes as the source does.
    let s = fixtures().join("models/qwen2_moe.q4_0.gguf");
    let out = scratch("vocab.packed.gguf");
    run_ok(&[
        "pack",
        s.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let (g1, g2) = (header(&s), header(&out));
    for k in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    ] {
        assert_eq!(g1.get(k), g2.get(k), "{k}");
    }
    std::fs::remove_file(&out).unwrap();
}

/// A packed file written before records were padded to the file's
/// alignment (general.alignment 32, records on 4 KiB boundaries with
/// gaps), by sluice at f2b2313: it still loads, streams with its
/// checksums verified, and gives its source's logits.
#[test]
fn files_packed_by_earlier_versions_still_load() {
    let old = fixtures().join("legacy/qwen2_moe.q4_0.packed-v1.gguf");
    let src = fixtures().join("models/qwen2_moe.q4_0.gguf");
    let g = header(&old);
    assert_eq!(g.alignment, 32, "the fixture is the old layout");
    assert!(
        !llama_cpp_layout_errors(&g).is_empty(),
        "the fixture is the old layout"
    );
    let toks = "5,17,250,3,99";
    let want = run_ok(&["logits", "--model", src.to_str().unwrap(), "--tokens", toks]).0;
    let o = old.to_str().unwrap();
    assert_eq!(run_ok(&["logits", "--model", o, "--tokens", toks]).0, want);
    let streamed = run_ok(&[
        "logits",
        "--model",
        o,
        "--tokens",
        toks,
        "--io",
        "pread",
        "--cache-slots",
        "2",
        "--verify",
    ])
    .0;
    assert_eq!(streamed, want);
}
