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

#[test]
fn embedding_example_matches_the_engine() {
    // Built here, so that running this test alone cannot skip it; the test
    // profile's artifacts leave only the example's own build.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "-p", "sluice", "--example", "moe_layer"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    } else {
        build.args(["--profile", "test"]);
    }
    assert!(
        build.status().unwrap().success(),
        "building the example failed"
    );
    let bin = profile_dir.join("examples").join("moe_layer");
    assert!(bin.exists(), "{} was not built", bin.display());
    for m in ["qwen3_moe", "qwen2_moe.q4_0.gguf", "olmoe.bf16.gguf"] {
        let out = std::process::Command::new(&bin)
            .arg(fixture(m))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("max |ours - engine|"));
    }
}
