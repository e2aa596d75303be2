//! Core vocabulary shared by every sluice crate.
//!
//! * [`DType`]: element and quantized-block types, with the byte geometry of
//!   their blocks (GGUF's numbering, since GGUF is the richest format).
//! * [`quant`]: reference dequantization of every block type.
//! * [`Backend`]: the trait a compute backend (CPU, Metal, simulated device)
//!   implements; the forward pass is written against it only.
//! * [`DeviceExec`]: the second trait, of accelerators that keep a token's
//!   activations on the device and submit a layer's work at once.
//! * [`ops`]: the portable element-wise kernels that backends default to.
//! * [`Error`]: the one error type of the library crates.
//! * [`size`]: byte sizes as written on command lines and in messages.

pub mod backend;
pub mod device;
pub mod dtype;
pub mod error;
pub mod fp8;
pub mod ops;
pub mod quant;
pub mod record;
pub mod size;

pub use backend::{fresh_weight_id, AttnParams, Backend, DeviceTraffic, WeightView};
pub use device::{DevBuf, DevOp, DeviceBatch, DeviceExec};
pub use dtype::{DType, Fp8Block, Fp8Scale, HalfType, MlxQuant};
pub use error::{Error, Result};
pub use ops::Yarn;
pub use size::{fmt_size, parse_size};
