//! The RAM cap's plan: a compute backend's own copies in the same RAM (a
//! GPU on unified memory) are planned under the cap, so they take room
//! from the expert slots instead of going over the cap.

use std::path::{Path, PathBuf};

use sluice_engine::stream::{StreamOptions, Streamer};
use sluice_engine::Model;
use sluice_io::{EngineOptions, IoKind};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn open(cap: u64, device_copies: u64) -> sluice_core::Result<Streamer> {
    let mut model = Model::open(fixture("qwen3_moe")).unwrap();
    Streamer::open(
        &mut model,
        &StreamOptions {
            io: EngineOptions {
                kind: IoKind::Pread,
                direct: false,
                ..EngineOptions::default()
            },
            ram_cap: Some(cap),
            ctx: 64,
            batch: 16,
            device_copies,
            ..StreamOptions::default()
        },
    )
}

#[test]
fn device_copies_are_planned_under_the_cap() {
    let big = u64::MAX / 4;
    let plain = open(big, 0).unwrap();
    let b = plain.budget().clone();
    drop(plain);
    assert_eq!(b.device, 0);
    assert!(b.dense > 0 && b.slot > 0);
    assert!(!b.describe().contains("GPU copies"), "{}", b.describe());
    for (copies, want) in [
        // Copies up to the budget, plus one expert's upload buffer.
        (4 * b.slot, 5 * b.slot),
        // Beyond the dense weights' size: all there is to copy.
        (1 << 40, b.dense + b.slot),
    ] {
        let s = open(big, copies).unwrap();
        let b = s.budget();
        assert_eq!(b.device, want, "{copies}: {}", b.describe());
        assert!(b.describe().contains("GPU copies"), "{}", b.describe());
        // Planned with everything else: the slots get what is left.
        assert_eq!(
            b.planned(),
            b.baseline + b.margin + b.dense + b.kv + b.scratch + b.device + b.slot * b.slots as u64
        );
    }
}
