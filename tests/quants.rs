//! Each block type dequantizes exactly like `gguf.quants.dequantize` on the
//! recorded random blocks in tests/fixtures/quants.

mod common;

use sluice_core::{quant, DType};

#[test]
fn every_block_type_matches_gguf_py() {
    let dir = common::fixtures().join("quants");
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let mut checked = 0;
    for t in DType::ALL.into_iter().filter(|t| *t != DType::F32) {
        let entry = &idx[t.name()];
        assert!(entry.is_object(), "no recorded blocks for {t}");
        assert_eq!(
            entry["type_size"].as_u64().unwrap() as usize,
            t.block_bytes(),
            "{t}"
        );
        assert_eq!(
            entry["block_size"].as_u64().unwrap() as usize,
            t.block_size(),
            "{t}"
        );
        assert_eq!(
            entry["ggml_type_id"].as_u64().unwrap() as u32,
            t.ggml_id(),
            "{t}"
        );
        let raw = std::fs::read(dir.join(format!("{}.bin", t.name()))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", t.name())))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut got = vec![0f32; want.len()];
        quant::dequantize(t, &raw, &mut got).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
                "{t} element {i}: {a} vs gguf-py {b}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, DType::ALL.len() - 1);
}
