//! Talking to a streamed model: the model's own chat template
//! ([`template`]), its tool calls and reasoning parsed back into OpenAI's
//! shapes ([`tools`]), a generation loop that reuses the KV cache of the
//! shared prefix across turns ([`chat`]), and an OpenAI-compatible HTTP
//! server ([`server`]) for `sluice serve`.

pub mod chat;
pub mod grammar;
pub mod server;
pub mod template;
pub mod tools;

pub use chat::{Finish, GenParams, Generator, Outcome};
pub use template::{ChatTemplate, Family};
