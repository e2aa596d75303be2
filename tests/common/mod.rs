//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The built `sluice` binary.
pub fn sluice() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Runs sluice with `args`, asserting success; returns (stdout, stderr).
pub fn run_ok(args: &[&str]) -> (String, String) {
    let out = sluice().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sluice {args:?} failed: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// An oracle: tokens and the reference logits at every position.
pub struct Expected {
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
}

pub fn read_expected(p: &Path) -> Expected {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Expected { tokens, logits }
}

/// Asserts `got` matches `want` within `rel × max|want|` at every position.
pub fn assert_close(name: &str, got: &[Vec<f32>], want: &[Vec<f32>], rel: f32) {
    assert_eq!(got.len(), want.len(), "{name}: position count");
    let max = want.iter().flatten().fold(0f32, |a, &b| a.max(b.abs()));
    let mut worst = 0f32;
    for (p, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{name}: vocab at position {p}");
        for (a, b) in g.iter().zip(w) {
            assert!(a.is_finite(), "{name}: non-finite logit at position {p}");
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst <= rel * max,
        "{name}: max abs error {worst} exceeds {rel} × max|logit| = {}",
        rel * max
    );
    // Shown with `cargo test --test oracle -- --nocapture`.
    println!(
        "{name}: max abs error {worst:.2e}, max|logit| {max:.2}, relative {:.2e}",
        worst / max
    );
}

/// Runs sluice expecting failure: exit code 1, one `error:` line, no panic.
#[allow(dead_code)]
pub fn fails(args: &[&str]) -> String {
    let out = sluice().args(args).output().unwrap();
    let all = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    // Informational `note:` lines may precede the error.
    let err: String = all
        .lines()
        .filter(|l| !l.starts_with("note: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {all}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert!(
        err.starts_with("error: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    err
}

/// Every (model path, expected.json) pair under tests/fixtures/models and
/// tests/fixtures/llamacpp (GGUF files made by llama.cpp's converter).
pub fn oracles() -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    let mut v = Vec::new();
    for dir in ["models", "llamacpp"].map(|d| fixtures().join(d)) {
        oracles_in(&dir, &mut v);
    }
    v.sort();
    v
}

fn oracles_in(dir: &std::path::Path, v: &mut Vec<(std::path::PathBuf, std::path::PathBuf)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && p.join("expected.json").is_file() {
            v.push((p.clone(), p.join("expected.json")));
        } else if p.extension().is_some_and(|x| x == "gguf") {
            let exp = p.with_extension("expected.json");
            assert!(exp.is_file(), "{} has no oracle", p.display());
            v.push((p, exp));
        }
    }
}
