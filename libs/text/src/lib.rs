//! Text around a BD3-LM: tokenizers with their special ids, incremental decoding for
//! streaming, and the stop rules of generation. No network code: the coordinator and the
//! command line share it.

pub mod stop;
mod tokenizer;

pub use stop::{StopHook, StopReason, StopRules};
pub use tokenizer::{Decoder, Error, Text};
