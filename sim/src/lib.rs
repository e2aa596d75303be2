//! sluice's simulator: what a model does on a device one does not have.
//!
//! A discrete-event simulation of prefill and decode: a flash queue
//! (bandwidth, per-read latency, queue depth), compute per layer from the
//! model's geometry and the device's throughput ([`device`]), the RAM
//! budget the engine would plan ([`run::plan`]), and the engine's own expert
//! cache and predictors (`sluice-cache`, not a copy), driven by a routing
//! trace or a statistical routing model ([`routing`]). Devices are TOML
//! profiles whose every figure names its source ([`profile`]).

pub mod device;
pub mod geometry;
pub mod profile;
pub mod routing;
pub mod run;
pub mod sweep;

pub use device::{Costs, FlashQueue};
pub use geometry::{Quant, SimModel};
pub use profile::{Figure, Profile};
pub use routing::{Routes, StatRoutes, TraceRoutes};
pub use run::{plan, simulate, PassReport, Residency, SimOptions, SimReport};
