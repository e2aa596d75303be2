//! A safetensors model directory of arbitrary bytes: the input is
//! `len (u16 LE) | config.json | model.safetensors`.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let (cfg, st) = rest.split_at(n.min(rest.len()));
    let d = common::scratch().join("st");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), cfg).unwrap();
    std::fs::write(d.join("model.safetensors"), st).unwrap();
    common::load_and_run(&d);
});
