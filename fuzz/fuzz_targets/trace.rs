//! A routing trace of arbitrary bytes, as JSON and as llama.cpp CSV; one
//! that parses is analysed (`trace stats`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz-input");
    let mut traces = Vec::new();
    if let Ok(t) = sluice_trace::Trace::from_json(data, p) {
        traces.push(t);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = sluice_trace::Trace::from_csv(text, p) {
            traces.push(t);
        }
    }
    for t in traces {
        let o = sluice_trace::StatsOptions {
            slots: vec![2, 4],
            decode_only: false,
            expert_bytes: 1 << 20,
        };
        let _ = sluice_trace::stats(&t, &o);
    }
});
