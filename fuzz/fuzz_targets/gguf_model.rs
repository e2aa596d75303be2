//! A GGUF file of arbitrary bytes, opened as a model.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The header parser alone, then the whole load.
    let _ = sluice_format::gguf::parse(data);
    let p = common::scratch().join("m.gguf");
    std::fs::write(&p, data).unwrap();
    common::load_and_run(&p);
});
