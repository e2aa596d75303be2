//! Helpers shared by the engine test files.

use std::path::PathBuf;

/// A file of `len` deterministic pseudo-random bytes (seeded by `len` and
/// `seed`) under the test target's temporary directory `tag`, unique to
/// `name` and this process.
pub fn fixture(tag: &str, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.bin", std::process::id()));
    let mut rng = fastrand::Rng::with_seed(len as u64 ^ seed);
    let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    std::fs::write(&path, &data).unwrap();
    (path, data)
}
