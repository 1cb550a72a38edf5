//! The training service's model, shared by the coordinator (which serves the `Training`
//! API), the trainer workers and the denoise workers that follow a model:
//!
//! * [`spec`]: a job's specification, validated from the wire with every default filled
//!   in, and turned into the trainer's options;
//! * [`job`]: a job's record (state, progress, attempts, published versions) and
//!   [`Jobs`], the records and the queue in the store;
//! * [`registry`]: published model versions: immutable checkpoint directories in the
//!   registry's storage and their records in the store;
//! * [`figure`]: the records' figures as JSON that always decodes, infinities and NaN
//!   included.
#![warn(missing_docs)]

mod error;
pub mod figure;
pub mod job;
pub mod registry;
pub mod spec;

pub use error::{Error, Result};
pub use job::{Job, JobState, Jobs, Progress};
pub use registry::{ModelVersion, Registry};
pub use spec::JobSpec;

/// A new random id: 32 lowercase hex digits.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Counts and logs a stored record of `kind` that does not decode (a listing skips it).
fn undecodable(kind: &'static str, e: &Error) {
    tracing::warn!(kind, error = %e, "a stored record does not decode; skipped");
    metrics::counter!(UNDECODABLE, "kind" => kind).increment(1);
}

const UNDECODABLE: &str = "bd3lm_undecodable_records_total";

/// Describes the training service's records' metrics to the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        registry::RETIRED,
        "Model versions retired, by who retired them: api (RetireModelVersion) or policy (the trainers' --keep-versions)"
    );
    metrics::describe_counter!(
        registry::FILES_REMOVED,
        "Retired model versions whose files a trainer removed from the registry's storage"
    );
    metrics::describe_counter!(
        UNDECODABLE,
        "Stored job and model-version records a listing skipped because they do not decode, by kind"
    );
}
