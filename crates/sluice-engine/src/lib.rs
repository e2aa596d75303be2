//! sluice's engine: MoE architectures, the forward pass, KV cache,
//! sampling and tokenization.
//!
//! Data flow for one batch of tokens ([`Session::forward`]): embedding rows
//! are dequantized from the mapped file; each layer normalizes, projects
//! q/k/v through the [`sluice_core::Backend`], applies rotary embeddings,
//! appends to the KV cache and attends; the MoE block routes each token to
//! its top-k experts and runs them expert-major; the final norm and output
//! projection give logits. Weights are never copied out of the model file
//! (see [`model`]).

// Every unsafe block and impl must say why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod forward;
pub mod gguf_meta;
pub mod model;
pub mod pack;
pub mod replay;
pub mod sampler;
pub mod stream;
pub mod synth;
pub mod tokenizer;

pub use config::{Arch, Config};
pub use forward::{Route, RouteObserver, Session};
pub use model::Model;
pub use sampler::Sampler;
pub use tokenizer::{TextStream, Tokenizer};
