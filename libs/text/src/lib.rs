//! Text around a BD3-LM: tokenizers with their special ids (loaded, trained or built from
//! GPT-2's files), corpus files, incremental decoding for
//! streaming, and the stop rules of generation. No network code: the coordinator and the
//! command line share it.
#![warn(missing_docs)]

pub mod bpe;
mod corpus;
pub mod stop;
mod tokenizer;

pub use corpus::text_files;
pub use stop::{StopHook, StopReason, StopRules};
pub use tokenizer::{Decoder, Error, Text};
