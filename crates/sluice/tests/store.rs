//! The facade: bytes equal the file's, pins hold, threads share a store,
//! hints and observations prefetch, and the embedding example agrees with
//! the engine.

use sluice::{Store, StoreOptions};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

fn fixture(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/models/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn file_bytes(path: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn expert_bytes_equal_the_files() {
    for m in [
        "qwen3_moe",
        "qwen2_moe.q4_0.gguf",
        "mixtral.f16.gguf",
        "qwen2_moe_sharded",
    ] {
        let store = Store::open(
            fixture(m),
            &StoreOptions {
                slots: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        let g = store.geometry().clone();
        for &layer in &g.moe_layers {
            for id in 0..g.experts {
                let e = store.experts(layer, &[id]).unwrap().pop().unwrap();
                let src = store.source(layer, id).unwrap();
                for (mat, (path, off, len)) in [e.gate(), e.up(), e.down()].iter().zip(src) {
                    assert_eq!(
                        mat.data,
                        &file_bytes(&path, off, len)[..],
                        "{m} layer {layer} expert {id}"
                    );
                }
            }
        }
    }
}

#[test]
fn pinned_experts_stay_and_overcommit_fails() {
    let store = Store::open(
        fixture("qwen3_moe"),
        &StoreOptions {
            slots: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let layer = store.geometry().moe_layers[0];
    let a = store.experts(layer, &[0, 1]).unwrap();
    let before = a[0].gate().data.to_vec();
    let err = store
        .experts(layer, &[2])
        .err()
        .expect("no free slot")
        .to_string();
    assert!(err.contains("slots"), "{err}");
    assert!(store.experts(layer, &[0, 1, 2]).is_err());
    assert!(store.experts(layer, &[99]).is_err());
    assert_eq!(a[0].gate().data, &before[..], "a pinned expert changed");
    drop(a);
    let b = store.experts(layer, &[2, 3]).unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(store.stats().misses, 4);
}

#[test]
fn threads_share_a_store() {
    let store = Arc::new(
        Store::open(
            fixture("olmoe.bf16.gguf"),
            &StoreOptions {
                slots: Some(8),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let g = store.geometry().clone();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            let g = g.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let layer = g.moe_layers[(t + i) % g.moe_layers.len()];
                    let id = (t * 7 + i * 3) % g.experts;
                    let e = store.experts(layer, &[id]).unwrap().pop().unwrap();
                    let (path, off, len) = store.source(layer, id).unwrap()[2].clone();
                    assert_eq!(e.down().data, &file_bytes(&path, off, len)[..]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let s = store.stats();
    assert_eq!(s.hits + s.misses, 200);
}

#[test]
fn hints_and_observations_prefetch() {
    let store = Store::open(
        fixture("qwen3_moe"),
        &StoreOptions {
            slots: Some(6),
            ..Default::default()
        },
    )
    .unwrap();
    let g = store.geometry().clone();
    let layer = g.moe_layers[0];
    store.hint(layer, &[4, 5]).unwrap();
    let e = store.experts(layer, &[4, 5]).unwrap();
    assert_eq!(store.stats().misses, 0, "hinted experts were read again");
    drop(e);
    assert!(store.stats().prefetch_bytes > 0);
    let mut probs = vec![0.01f32; g.experts];
    probs[1] = 0.9;
    assert!(store.observe(layer, &probs[..2]).is_err());
    store.observe(layer, &probs).unwrap();
}

/// A `token` predictor told each token's id learns what that id used: when
/// a token comes back after others evicted its experts, its first MoE
/// layer's experts are read ahead at `begin_token`, before any router has
/// run, and its demand finds them.
#[test]
fn begin_token_prefetches_a_known_tokens_first_layer() {
    let store = Store::open(
        fixture("qwen3_moe"),
        &StoreOptions {
            slots: Some(16),
            prefetch: sluice::Prefetch::Token,
            ..Default::default()
        },
    )
    .unwrap();
    let g = store.geometry().clone();
    let first = g.moe_layers[0];
    let k = g.top_k;
    assert!(g.experts > 2 * k, "{g:?}");
    // One token as an embedder runs it: the router's choice at each MoE
    // layer is observed, then its experts are used.
    let token = |id: u32, ids: &[usize]| {
        store.begin_token(id).unwrap();
        for &l in &g.moe_layers {
            let mut p = vec![0.0f32; g.experts];
            for (i, &e) in ids.iter().enumerate() {
                p[e] = 0.9 - 0.1 * i as f32;
            }
            store.observe(l, &p).unwrap();
            drop(store.experts(l, ids).unwrap());
        }
    };
    let uses: Vec<usize> = (0..k).map(|i| 2 * i + 1).collect();
    let others: Vec<usize> = (0..g.experts).filter(|e| !uses.contains(e)).collect();
    for round in 0..3u32 {
        token(42, &uses);
        // Other tokens use every other expert of both layers, evicting
        // token 42's first-layer experts from the 16 slots.
        for t in 0..4u32 {
            let ids: Vec<usize> = (0..k)
                .map(|i| others[(t as usize * k + i) % others.len()])
                .collect();
            token(100 + round * 4 + t, &ids);
        }
    }
    let before = store.stats().prefetch_bytes;
    store.begin_token(42).unwrap();
    assert!(
        store.stats().prefetch_bytes > before,
        "nothing was read ahead for a token seen three times"
    );
    let misses = store.stats().misses;
    drop(store.experts(first, &uses).unwrap());
    assert_eq!(store.stats().misses, misses, "its experts were not ready");
}
