//! What the packed layout (written by the engine's `sluice pack`) tells a
//! reader: its `sluice.pack.*` keys, the record alignment and per-record
//! checksums that the streaming core verifies.

use crate::{ModelFiles, Value};
use sluice_core::{Error, Result};

/// Metadata keys of the packed layout.
pub mod keys {
    /// Layout version (1).
    pub const VERSION: &str = "sluice.pack.version";
    /// Record alignment in bytes.
    pub const ALIGN: &str = "sluice.pack.align";
    /// Checksum algorithm (`xxh3-64`).
    pub const CHECKSUM: &str = "sluice.pack.checksum";
    /// One checksum per record, MoE layers in order, experts in order.
    pub const CHECKSUMS: &str = "sluice.pack.checksums";
    /// Quant type experts were re-quantized to, if any.
    pub const EXPERT_QUANT: &str = "sluice.pack.expert_quant";
    /// Where the weights came from (a path, or `synth:<preset>`).
    pub const SOURCE: &str = "sluice.pack.source";
}

/// The packed-layout facts of an opened model, if it is packed.
#[derive(Clone, Debug)]
pub struct PackInfo {
    /// Record alignment.
    pub align: u64,
    /// Per MoE layer (in layer order), per expert: xxh3-64 of the record.
    pub checksums: Vec<u64>,
}

impl PackInfo {
    /// Reads the `sluice.pack.*` keys of a model, `None` if it is not packed.
    pub fn of(files: &ModelFiles) -> Result<Option<PackInfo>> {
        let Some(g) = files.gguf() else {
            return Ok(None);
        };
        let Some(v) = g.get(keys::VERSION).and_then(Value::as_u64) else {
            return Ok(None);
        };
        let bad = |m: &str| Error::Format {
            path: files.path.clone(),
            format: "packed",
            msg: m.to_string(),
        };
        if v != 1 {
            return Err(bad(&format!("layout version {v} (this sluice reads 1)")));
        }
        let align = g.get(keys::ALIGN).and_then(Value::as_u64).unwrap_or(4096);
        let checksums = match g.get(keys::CHECKSUMS).and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .ok_or_else(|| bad("a record checksum is not a u64"))
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(Some(PackInfo { align, checksums }))
    }
}
