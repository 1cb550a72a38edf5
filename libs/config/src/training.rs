//! Training settings that the job specification and the trainer share.

use serde::{Deserialize, Serialize};

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Stay at the peak (the paper).
    Constant,
    /// Cosine down to a tenth of the peak at the last step.
    Cosine,
}
