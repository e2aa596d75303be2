//! A packed file's manifest (the `sluice.*` GGUF keys: config, alignment,
//! record checksums) of arbitrary bytes.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch().join("p.gguf");
    std::fs::write(&p, data).unwrap();
    if let Ok(files) = sluice_format::ModelFiles::open(&p) {
        let _ = sluice_engine::pack::PackInfo::of(&files);
        let _ = sluice_engine::config::Config::from_files(&files);
    }
    common::load_and_run(&p);
});
