//! What constrained decoding believes a token writes is what decoding
//! writes: for the fixtures' vocabularies (byte-level BPE from a
//! tokenizer.json, and GGUF vocabularies of both kinds), the bytes of a
//! text's tokens, in order, are the text.

use sluice_engine::Tokenizer;
use sluice_format::ModelFiles;
use std::path::Path;

#[test]
fn token_bytes_spell_the_text() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let text = "{\"city\": \"Zürich 21°\"} <|im_end|>\n\tdone";
    for m in [
        "models/qwen3_moe",
        "models/qwen2_moe.q4_0.gguf",
        "models/mixtral.f16.gguf",
        "llamacpp/gpt_oss.f16.gguf",
    ] {
        let files = ModelFiles::open(root.join(m)).unwrap();
        let tok = Tokenizer::for_model(&files).unwrap().unwrap();
        let table = tok.token_bytes();
        assert_eq!(table.len(), tok.vocab_size(), "{m}");
        let ids = tok.encode(text).unwrap();
        let mut bytes = Vec::new();
        for &id in &ids {
            bytes.extend_from_slice(&table[id as usize].0);
        }
        let got = String::from_utf8(bytes).unwrap();
        // SentencePiece vocabularies start the text with a space.
        assert_eq!(got.trim_start_matches(' '), text, "{m}");
        assert_eq!(
            tok.decode(&ids).unwrap().trim_start_matches(' '),
            text,
            "{m}"
        );
        // Added tokens are flagged.
        if let Some(id) = tok.token_id("<|im_end|>") {
            assert!(table[id as usize].1, "{m}");
        }
    }
}
