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
    /// Bad input from the caller that no other variant names: options that
    /// contradict each other, shapes a kernel cannot take, and the like.
    #[error("{0}")]
    Invalid(String),
    /// Reading one expert's record failed; `cause` says how (an I/O error,
    /// a short read).
    #[error("reading layer {layer} expert {expert}: {cause}")]
    ExpertRead {
        /// The layer.
        layer: usize,
        /// The expert.
        expert: usize,
        /// What went wrong.
        cause: Box<Error>,
    },
    /// A read engine reported success for fewer bytes than were asked.
    #[error("the read engine reported success after {got} of the wanted {wanted} bytes")]
    ShortRead {
        /// Bytes delivered.
        got: u64,
        /// Bytes asked for.
        wanted: u64,
    },
    /// A packed record whose bytes do not match the checksum stored for it.
    #[error("{}: checksum mismatch in layer {layer} expert {expert} (record at offset {offset}, {len} bytes): the file is corrupt", path.display())]
    Checksum {
        /// The packed file.
        path: PathBuf,
        /// The layer.
        layer: usize,
        /// The expert.
        expert: usize,
        /// Where the record starts.
        offset: u64,
        /// The record's bytes.
        len: u64,
    },
    /// A token id the model's vocabulary does not have.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfVocab {
        /// The token id.
        id: u32,
        /// Tokens in the vocabulary.
        vocab: usize,
    },
    /// An expert index beyond its layer's experts.
    #[error("expert {expert} is out of range: layer {layer} has {experts} experts")]
    ExpertOutOfRange {
        /// The layer.
        layer: usize,
        /// The expert asked for.
        expert: usize,
        /// Experts the layer has.
        experts: usize,
    },
    /// Experts asked for from a layer that routes none (or no such layer).
    #[error("layer {layer} is not an MoE layer")]
    NotMoeLayer {
        /// The layer.
        layer: usize,
    },
    /// More distinct experts wanted at once than the cache has slots.
    #[error("{wanted} experts cannot be resident at once in {slots} slots")]
    TooManyExperts {
        /// Distinct experts wanted.
        wanted: usize,
        /// Slots in the cache.
        slots: usize,
    },
    /// No slot can be freed: every one is pinned by experts in use.
    #[error("no expert slot can be freed in layer {layer}: {slots} slots, all in use")]
    SlotsInUse {
        /// The layer that needed one.
        layer: usize,
        /// Slots in the cache.
        slots: usize,
    },
    /// An operation that needs an idle read engine found reads in flight.
    #[error("{op} needs an idle read engine; {in_flight} reads are in flight")]
    EngineBusy {
        /// What was attempted.
        op: &'static str,
        /// Reads in flight.
        in_flight: usize,
    },
    /// A path that is not a regular file where a file is needed.
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A read naming a file the engine has not opened.
    #[error("read of file #{id}, but only {open} files are open")]
    NoSuchFile {
        /// The file id the read named.
        id: usize,
        /// Files open.
        open: usize,
    },
    /// An aligned buffer that cannot be allocated.
    #[error("cannot allocate a buffer of {len} bytes aligned to {align}: {why}")]
    Alloc {
        /// Bytes asked for.
        len: usize,
        /// Alignment asked for.
        align: usize,
        /// Not a valid layout, or out of memory.
        why: &'static str,
    },
    /// A name that is not one of those known (a preset, an instruction set).
    #[error("unknown {what} {name:?} (known: {known})")]
    UnknownName {
        /// What kind of name.
        what: &'static str,
        /// The name given.
        name: String,
        /// The names known, comma-separated.
        known: String,
    },
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
