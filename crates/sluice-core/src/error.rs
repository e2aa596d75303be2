//! The library error type. Every variant names what was wrong and where, so
//! that the CLI can print one line and exit non-zero.

use std::path::PathBuf;

/// Errors of the sluice library crates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A model file that is malformed: truncated, inconsistent or hostile.
    #[error("{path}: invalid {format} file: {msg}")]
    Format {
        /// The offending file.
        path: PathBuf,
        /// `gguf`, `safetensors`, ...
        format: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// Valid input that sluice does not support (an architecture, a dtype).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A model whose configuration or tensors do not fit together.
    #[error("model: {0}")]
    Model(String),
    /// Bad input from the caller (tokens out of range, bad options).
    #[error("{0}")]
    Invalid(String),
    /// A RAM cap that cannot hold what must be resident. Embedders see
    /// this; the CLI words it with its own flag names.
    #[error("a RAM cap of {} is too small: {parts} need at least {}", crate::size::fmt_size(*cap), crate::size::fmt_size(*needed))]
    Budget {
        /// Bytes the plan needs at least.
        needed: u64,
        /// The cap.
        cap: u64,
        /// Where the bytes go, in words (dense weights, KV cache, slots...).
        parts: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
