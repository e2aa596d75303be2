//! Oracle tests: every fixture model's logits at all positions against the
//! logits Hugging Face transformers computed (scripts/make_fixtures.py, and
//! scripts/llama_cpp_fixtures.py for the files llama.cpp's converter made).
//! Float weights must match within 1e-3 × max|logit|; GGUF and MLX files
//! against transformers run on the same weights dequantized, within
//! 1e-3 × max|logit| on the exact path (f32 activations) and 1e-2 on the
//! default integer kernels, which quantize activations (measured: under
//! 1e-3, docs/BENCHMARKS.md).

mod common;

use common::*;
use sluice_backend_cpu::{Activations, CpuBackend, CpuOptions};
use sluice_engine::{Model, Session};
use std::path::Path;
use std::sync::Arc;

/// Whether a fixture's matrices are quantized (GGUF Q8_0/Q4_0, MLX, MXFP4).
fn quantized(path: &Path) -> bool {
    let n = path.file_name().unwrap().to_string_lossy();
    n.contains("q8_0") || n.contains("q4_0") || n.contains("mlx") || n.contains("mxfp4")
}

/// The bound of the default kernels for a fixture.
fn bound(path: &Path) -> f32 {
    if quantized(path) {
        1e-2
    } else {
        1e-3
    }
}

fn run_model(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    run_with(path, tokens, Activations::default())
}

fn run_with(path: &Path, tokens: &[u32], activations: Activations) -> Vec<Vec<f32>> {
    let model = Arc::new(Model::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let be = Arc::new(
        CpuBackend::with_options(CpuOptions {
            threads: Some(2),
            activations,
            isa: None,
        })
        .unwrap(),
    );
    let mut s = Session::new(model.clone(), be);
    let l = s.forward(tokens, true).unwrap();
    l.chunks_exact(model.config.vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn fixture_set_covers_every_architecture_and_layout() {
    let names: Vec<String> = oracles()
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "qwen3_moe",
        "qwen2_moe",
        "mixtral",
        "olmoe",
        "qwen3_moe_fused",
        "qwen2_moe_sharded",
        "qwen3_moe.q8_0.gguf",
        "qwen2_moe.q4_0.gguf",
        "mixtral.f16.gguf",
        "qwen3_5_moe",
        "qwen3_5_moe_vl",
        "qwen3_5_moe_mlx",
        "qwen3_5_moe.q8_0.gguf",
        "deepseek_v3",
        "deepseek_v3_lite",
        "glm4_moe",
        "glm4_moe_air",
        "qwen3_next",
        "llama4",
        "llama4_maverick",
        "gpt_oss",
        "gpt_oss_plain",
        "gpt_oss_mxfp4",
        "deepseek_v3_fp8",
        "glm4_moe_fp8",
        "qwen3_moe_fp8",
        "qwen3_next_mlx",
        "glm4_moe_fp8_channel",
    ]
    .into_iter()
    .map(String::from)
    .chain(
        // llama.cpp's converter, every architecture it converts, at each type
        [
            "qwen3_moe",
            "qwen2_moe",
            "mixtral",
            "olmoe",
            "qwen3_5_moe",
            "deepseek_v3",
            "glm4_moe",
            "qwen3_next",
            "llama4",
            "gpt_oss",
            // MXFP4 experts as the converter repacks the published layout
            "gpt_oss_mxfp4",
        ]
        .iter()
        .flat_map(|a| ["f32", "f16", "q8_0"].map(|t| format!("{a}.{t}.gguf"))),
    ) {
        assert!(names.contains(&want), "fixture {want} missing: {names:?}");
    }
}

#[test]
fn all_fixtures_match_transformers() {
    let mut checked = 0;
    for (model, exp) in oracles() {
        let e = read_expected(&exp);
        let got = run_model(&model, &e.tokens);
        assert_close(&model.display().to_string(), &got, &e.logits, bound(&model));
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} oracles found");
}

#[test]
fn the_exact_path_matches_transformers_within_1e_3() {
    let mut quantized_checked = 0;
    for (model, exp) in oracles() {
        if !quantized(&model) {
            continue;
        }
        let e = read_expected(&exp);
        let got = run_with(&model, &e.tokens, Activations::F32);
        assert_close(&model.display().to_string(), &got, &e.logits, 1e-3);
        quantized_checked += 1;
    }
    assert!(
        quantized_checked >= 4,
        "only {quantized_checked} quantized oracles"
    );
}

#[test]
fn prompt_in_pieces_equals_prompt_at_once() {
    // KV cache correctness: feeding tokens one by one must give the same
    // last-position logits as one batch (up to float reassociation); the
    // latent cache of DeepSeek's attention included.
    // Llama 4's chunks and temperature tuning depend on absolute positions.
    for name in [
        "qwen2_moe",
        "deepseek_v3",
        "deepseek_v3_lite",
        "glm4_moe",
        "llama4",
        // sliding windows and sinks
        "gpt_oss",
    ] {
        let p = fixtures().join("models").join(name);
        let e = read_expected(&p.join("expected.json"));
        let model = Arc::new(Model::open(&p).unwrap());
        let be = Arc::new(CpuBackend::new(Some(2)).unwrap());
        let mut s = Session::new(model.clone(), be);
        let mut last = Vec::new();
        for (i, t) in e.tokens.iter().enumerate() {
            last = s.forward(&[*t], false).unwrap();
            assert_eq!(s.pos(), i + 1);
        }
        assert_close(name, &[last], &[e.logits.last().unwrap().clone()], 1e-3);
    }
}

#[test]
fn linear_attention_state_carries_across_calls() {
    // Gated DeltaNet keeps a conv history and a recurrent state between
    // calls: the prompt in uneven pieces (one token, three, the rest) must
    // give the oracle's logits at every position.
    for name in [
        "qwen3_5_moe",
        "qwen3_5_moe_vl",
        "qwen3_5_moe.q8_0.gguf",
        "qwen3_next",
        "../llamacpp/qwen3_next.q8_0.gguf",
    ] {
        let p = fixtures().join("models").join(name);
        let e = if name.ends_with(".gguf") {
            read_expected(&p.with_extension("expected.json"))
        } else {
            read_expected(&p.join("expected.json"))
        };
        let model = Arc::new(Model::open(&p).unwrap());
        let be = Arc::new(CpuBackend::new(Some(2)).unwrap());
        let mut s = Session::new(model.clone(), be);
        let mut got = Vec::new();
        for piece in [&e.tokens[..1], &e.tokens[1..4], &e.tokens[4..]] {
            let l = s.forward(piece, true).unwrap();
            got.extend(l.chunks_exact(model.config.vocab).map(<[f32]>::to_vec));
        }
        assert_close(name, &got, &e.logits, bound(&p));
        // After a reset the state is empty again: same logits as fresh.
        s.reset();
        let again = s.forward(&e.tokens, true).unwrap();
        let again: Vec<Vec<f32>> = again
            .chunks_exact(model.config.vocab)
            .map(<[f32]>::to_vec)
            .collect();
        assert_close(name, &again, &e.logits, bound(&p));
    }
}

#[test]
fn logits_cli_prints_json_matching_the_oracle() {
    let p = fixtures().join("models/olmoe");
    let e = read_expected(&p.join("expected.json"));
    let toks: Vec<String> = e.tokens.iter().map(u32::to_string).collect();
    let toks = toks.join(",");
    let (out, _) = run_ok(&["logits", "--model", p.to_str().unwrap(), "--tokens", &toks]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens, e.tokens);
    assert_close("cli", &got, &e.logits, 1e-3);
}
