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

/// Many threads read experts through one store whose few slots force
/// eviction under contention: every byte of every expert a thread holds
/// equals the file's, before and after other threads have run (a pinned
/// slot is never evicted or overwritten), contention is answered with an
/// error about slots rather than a wait forever, and the cache did evict.
#[test]
fn concurrent_readers_under_eviction_see_the_files_bytes() {
    const THREADS: usize = 6;
    const ROUNDS: usize = 150;
    let path = fixture("qwen2_moe.q4_0.gguf");
    for io in [sluice::IoKind::Uring, sluice::IoKind::Pread] {
        let store = Arc::new(
            Store::open(
                &path,
                &StoreOptions {
                    slots: Some(4),
                    io,
                    queue_depth: 4,
                    prefetch: "none".into(),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let g = store.geometry().clone();
        // The resident copy: every expert's three matrices, read plainly.
        let mut want = std::collections::HashMap::new();
        for &layer in &g.moe_layers {
            for id in 0..g.experts {
                let src = store.source(layer, id).unwrap();
                let m: Vec<Vec<u8>> = src
                    .iter()
                    .map(|(p, off, len)| file_bytes(p, *off, *len))
                    .collect();
                want.insert((layer, id), m);
            }
        }
        let want = Arc::new(want);
        let t0 = std::time::Instant::now();
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, g, want) = (store.clone(), g.clone(), want.clone());
                std::thread::spawn(move || {
                    // A small xorshift: the facade has no random-number dependency.
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                    let mut next = |n: usize| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % n as u64) as usize
                    };
                    let (mut held, mut busy) = (0usize, 0usize);
                    while held < ROUNDS {
                        let layer = g.moe_layers[next(g.moe_layers.len())];
                        let a = next(g.experts);
                        let ids = if next(2) == 0 {
                            vec![a]
                        } else {
                            vec![a, (a + 1 + next(g.experts - 1)) % g.experts]
                        };
                        let guards = match store.experts(layer, &ids) {
                            Ok(gs) => gs,
                            Err(e) => {
                                let e = e.to_string();
                                assert!(e.contains("slots"), "thread {t}: {e}");
                                busy += 1;
                                std::thread::yield_now();
                                continue;
                            }
                        };
                        let check = |when: &str| {
                            for (e, &id) in guards.iter().zip(&ids) {
                                assert_eq!((e.layer(), e.id()), (layer, id));
                                let w = &want[&(layer, id)];
                                for (m, w) in [e.gate(), e.up(), e.down()].iter().zip(w) {
                                    assert!(
                                        m.data == &w[..],
                                        "thread {t}: layer {layer} expert {id} differs {when}"
                                    );
                                }
                            }
                        };
                        check("when acquired");
                        // Let the others evict and refill around our pins.
                        for _ in 0..1 + next(3) {
                            std::thread::yield_now();
                        }
                        check("while pinned");
                        held += 1;
                    }
                    busy
                })
            })
            .collect();
        let busy: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let s = store.stats();
        let distinct = g.moe_layers.len() * g.experts;
        eprintln!(
            "{io:?}: {THREADS} threads × {ROUNDS} acquisitions in {:.2}s; {} misses, {} hits, {busy} refused for lack of free slots",
            t0.elapsed().as_secs_f64(),
            s.misses,
            s.hits
        );
        assert!(
            s.misses > 2 * distinct as u64,
            "{} misses for {distinct} experts: the cache did not evict",
            s.misses
        );
    }
}
