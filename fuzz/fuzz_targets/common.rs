//! Shared by the fuzz targets: hostile bytes go through the same path as a
//! model file on disk, `Model::open`, and a model that loads runs one token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A per-process scratch directory in RAM.
pub fn scratch() -> PathBuf {
    let d = Path::new("/dev/shm").join(format!("sluice-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Opens the model at `path`; when it loads and is small, runs two tokens.
/// Errors are the expected outcome; a panic or an abort is the bug.
pub fn load_and_run(path: &Path) {
    let Ok(model) = sluice_engine::Model::open(path) else {
        return;
    };
    // Loading succeeded, so every tensor was checked against the config;
    // bound the work of the forward pass, not its safety.
    if model.files.total_tensor_bytes() > 64 << 20 || model.config.vocab > 1 << 16 {
        return;
    }
    let model = Arc::new(model);
    let be = Arc::new(sluice_backend_cpu::CpuBackend::new(Some(1)).unwrap());
    let mut s = sluice_engine::Session::new(model, be);
    let _ = s.forward(&[0, 1], true);
}
