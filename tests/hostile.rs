//! Corrupted model files must be refused with an error or loaded, never
//! panic: random byte mutations of a GGUF header and of a safetensors header
//! are opened and, when they still open, run for one token.

mod common;

use proptest::prelude::*;
use sluice_backend_cpu::CpuBackend;
use sluice_engine::{Model, Session};
use std::sync::Arc;

fn try_model(path: &std::path::Path) {
    if let Ok(m) = Model::open(path) {
        let m = Arc::new(m);
        let be = Arc::new(CpuBackend::new(Some(1)).unwrap());
        let _ = Session::new(m, be).forward(&[1, 2], true);
    }
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], limit: usize) -> Vec<u8> {
    for &(pos, val) in edits {
        let i = pos % limit.min(bytes.len());
        bytes[i] = val;
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn mutated_gguf_headers_never_panic(
        which in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        // A Qwen3 file of our writer, and DeepSeek's latent attention and
        // YaRN keys as llama.cpp's converter writes them.
        let file = if which { "models/qwen3_moe.q8_0.gguf" } else { "llamacpp/deepseek_v3.q8_0.gguf" };
        let src = std::fs::read(common::fixtures().join(file)).unwrap();
        // The header (metadata and tensor records) is in the first ~16 KiB.
        let bytes = mutate(src, &edits, 16 << 10);
        let dir = std::env::temp_dir().join(format!("sluice-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        try_model(&p);
    }

    #[test]
    fn mutated_safetensors_headers_never_panic(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let src = common::fixtures().join("models/mixtral");
        let st = std::fs::read(src.join("model.safetensors")).unwrap();
        let hlen = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize + 8;
        let bytes = mutate(st, &edits, hlen);
        let dir = std::env::temp_dir().join(format!("sluice-hostile-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        try_model(&dir);
    }
}
