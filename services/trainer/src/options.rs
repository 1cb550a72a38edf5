//! A job's specification onto the trainer's options: the one place where the training
//! service's plain spec meets the training library.

use bd3lm_config::shards::ShardIndex;
use bd3lm_jobs::spec::{Init, JobSpec, scratch_config};
use bd3lm_jobs::{Error, Registry, Result};
use bd3lm_training::{Init as TrainInit, TrainOptions};

/// The trainer's options of `spec`.
pub fn train_options(spec: &JobSpec) -> TrainOptions {
    TrainOptions::from_recipe(spec.data.clone(), &spec.recipe)
}

/// Where `spec`'s weights start: a new network on its data, or the version's checkpoint
/// in `registry`.
pub fn train_init(spec: &JobSpec, registry: &Registry) -> Result<TrainInit> {
    match &spec.init {
        Init::Shape(backbone) => {
            let index =
                ShardIndex::open(&spec.data).map_err(|e| Error::invalid("data", e.to_string()))?;
            let config = scratch_config(&index, *backbone, spec.block_size)
                .map_err(|e| Error::invalid("shape", e.to_string()))?;
            Ok(TrainInit::Scratch(config))
        }
        Init::FineTune { name, version } => Ok(TrainInit::Checkpoint {
            dir: registry.path(name, *version)?,
            block_size: Some(spec.block_size),
        }),
    }
}
