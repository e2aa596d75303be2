//! Compiles examples/c/stream_experts.c against the committed header and
//! the static library, runs it on fixture models, and checks the header
//! declares every exported function.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn header_declares_every_export() {
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let h = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/sluice.h"))
        .unwrap();
    let mut n = 0;
    for l in src.lines() {
        if let Some(rest) = l
            .trim()
            .strip_prefix("pub unsafe extern \"C\" fn ")
            .or_else(|| l.trim().strip_prefix("pub extern \"C\" fn "))
        {
            let name = rest.split('(').next().unwrap();
            assert!(
                h.contains(&format!("{name}(")),
                "include/sluice.h lacks {name}: regenerate it with cbindgen"
            );
            n += 1;
        }
    }
    assert!(n >= 10, "found only {n} exports");
}

#[test]
fn c_program_streams_fixture_experts() {
    // `cargo test` links tests against the rlib only: build the static
    // library the C program links (a no-op when it is up to date).
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root())
        .args(["build", "-p", "sluice-capi", "--lib"]);
    // The test profile's artifacts are what this very test was built from:
    // only the library's own link step is left to do.
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    } else {
        build.args(["--profile", "test"]);
    }
    let st = build.status().expect("cargo");
    assert!(st.success(), "building the static library failed");
    let lib = profile_dir.join("libsluice_capi.a");
    assert!(lib.exists(), "{} was not built", lib.display());
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stream_experts");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .arg(root().join("examples/c/stream_experts.c"))
        .arg("-I")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .expect("a C compiler (cc)");
    assert!(st.success(), "compiling the C example failed");
    for m in ["qwen2_moe.q4_0.gguf", "mixtral.f16.gguf", "olmoe.bf16.gguf"] {
        let model = root().join("tests/fixtures/models").join(m);
        let r = Command::new(&out).arg(&model).output().unwrap();
        let so = String::from_utf8_lossy(&r.stdout);
        assert!(
            r.status.success(),
            "{m}: {}{}",
            so,
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(so.starts_with("ok: "), "{so}");
    }
}
