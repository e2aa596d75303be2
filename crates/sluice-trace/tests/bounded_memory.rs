//! Hostile traces cannot make the parser or the predictors allocate what a
//! header claims: the peak of live heap bytes is measured by a counting
//! allocator around each case (found by `cargo fuzz run trace`).

use sluice_trace::{StatsOptions, Trace};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One case at a time: the counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak heap bytes allocated while `f` runs, above what was live before.
fn peak_of(f: impl FnOnce()) -> usize {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    f();
    PEAK.load(Relaxed).saturating_sub(base)
}

const LIMIT: usize = 64 << 20;

#[test]
#[cfg_attr(miri, ignore = "thousands of steps: many minutes under Miri")]
fn cross_layer_memory_follows_what_was_seen_not_experts_squared() {
    // 60,000 experts: a dense E×E table per layer would be 14 GB each.
    let peak = peak_of(|| {
        let mut p = sluice_cache::predictor_by_name("xlayer", 4, 60_000).unwrap();
        let mut out = Vec::new();
        for t in 0..200u32 {
            for l in 0..4 {
                p.observe(l, &[t % 50, 59_999 - t % 7, 1000 + l as u32]);
                p.predict(l, 8, &mut out);
            }
        }
        assert!(!out.is_empty(), "the predictor predicts nothing");
    });
    assert!(peak < LIMIT, "xlayer over 60,000 experts used {peak} bytes");
}

#[test]
#[cfg_attr(miri, ignore = "bounds a 4096-layer table: minutes under Miri")]
fn csv_that_claims_many_layers_per_line_is_refused_within_bounds() {
    // Every other line jumps to layer 4095 and back: each token would hold
    // 4096 layer cells for 14 bytes of input.
    let text = "4095,0\n0,0\n".repeat(50_000);
    let peak = peak_of(|| {
        let r = Trace::from_csv(&text, Path::new("hostile.csv"));
        let Err(e) = r else {
            panic!("a CSV of 4096-layer jumps was accepted")
        };
        let e = e.to_string();
        assert!(e.contains("hostile.csv"), "{e}");
    });
    assert!(peak < LIMIT, "parsing used {peak} bytes");
}

#[test]
#[cfg_attr(miri, ignore = "thousands of steps: many minutes under Miri")]
fn json_whose_header_claims_a_huge_geometry_is_refused_or_bounded() {
    let route = r#"{"layers":{"0":{"experts":[1]}}}"#;
    let routes = vec![route; 5_000].join(",");
    for (layers, experts) in [(4096, 65_536), (4096, 1000), (2, 60_000)] {
        let doc = format!(
            r#"{{"meta":{{"num_layers":{layers},"num_experts":{experts},"top_k":1}},"routes":[{routes}]}}"#
        );
        let peak = peak_of(|| {
            if let Ok(t) = Trace::from_json(doc.as_bytes(), Path::new("hostile.json")) {
                let o = StatsOptions {
                    slots: vec![2],
                    decode_only: false,
                    expert_bytes: 1 << 20,
                    seed: Vec::new(),
                };
                let _ = sluice_trace::stats(&t, &o);
            }
        });
        assert!(
            peak < LIMIT,
            "{layers} layers × {experts} experts used {peak} bytes"
        );
    }
}
