//! The GPU compute backend, through `wgpu`: Metal on macOS and iOS, Vulkan
//! elsewhere (Mesa's lavapipe in CI).
//!
//! Two paths. Through [`sluice_core::DeviceExec`] (the forward pass's
//! default) a session keeps its activations, KV cache and recurrent
//! states in device buffers and submits a layer's work at once, waiting
//! only to read the router's logits and the output. Through the
//! [`Backend`](sluice_core::Backend) trait activations stay in host memory between operations:
//! each uploads its inputs, runs its kernels in one submission and reads
//! the result back. Both take their buffers from pools that a warm backend
//! no longer grows ([`Backend::device_traffic`](sluice_core::Backend::device_traffic) counts submissions, waits,
//! buffers and bytes). Weights reach the GPU with at most one copy: resident weights (a
//! [`WeightView::id`](sluice_core::WeightView::id)) are uploaded once and kept, up to a budget; streamed
//! experts are copied once, straight from their slot into an upload buffer
//! that on unified-memory adapters (Apple GPUs, lavapipe) is kept mapped
//! and is the memory the kernel reads. A matrix larger than the adapter's largest
//! storage binding is split by rows, and a batch whose activations would
//! be is split by tokens.
//!
//! The kernels (module `wgsl`) decode every weight type the CPU backend
//! supports in units of 32 values, mirroring `sluice_core::quant`
//! exactly; results differ from the CPU's only in the order of the sums.

//!
//! Built without its default `wgpu` feature the crate is empty, so that
//! `cargo check --workspace --no-default-features` needs no GPU stack.

#[cfg(feature = "wgpu")]
mod backend;
#[cfg(feature = "wgpu")]
mod wgsl;

#[cfg(feature = "wgpu")]
pub use backend::*;
