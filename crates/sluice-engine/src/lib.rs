//! sluice's engine: MoE architectures, the forward pass, KV cache,
//! sampling and tokenization.
//!
//! Data flow for one batch of tokens ([`Session::forward`]): embedding rows
//! are dequantized from the mapped file; each layer normalizes, projects
//! q/k/v through the [`sluice_core::Backend`], applies rotary embeddings,
//! appends to the KV cache and attends; the MoE block routes each token to
//! its top-k experts and runs them expert-major; the final norm and output
//! projection give logits. Weights are never copied out of the model file
//! (see [`model`]). A backend with a [`sluice_core::DeviceExec`] (the GPU)
//! runs the same steps on device-resident buffers instead, one submission
//! per MoE layer.

// Every unsafe block and impl must say why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod experts;
pub mod forward;
// The architecture configs and where a model's tensors lie are the format
// crate's (the streaming core and the facade need them without the engine).
pub use sluice_format::{config, model};
pub mod gguf_meta;
pub mod pack;
pub mod replay;
pub mod sampler;
pub mod synth;
pub mod tokenizer;

pub use config::{Arch, Config};
pub use experts::{ExpertSource, Resident, Streamed};
pub use forward::{Route, RouteObserver, Session, Snapshot};
pub use model::Model;
pub use sampler::Sampler;
/// The streaming core, re-exported for the engine's users.
pub use sluice_stream as stream;
pub use tokenizer::{TextStream, Tokenizer};
