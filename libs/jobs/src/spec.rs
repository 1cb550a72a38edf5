//! A job's specification: validated from the wire once, at submission, with every default
//! filled in and a fine-tune's "latest" resolved to a version, so the job trains the same
//! thing however often a trainer resumes it. Plain data: the trainer maps it onto its
//! options.

use std::path::{Path, PathBuf};

use bd3lm_config::shards::ShardIndex;
use bd3lm_config::{Backbone, Config, Decay, Recipe, Shape};
use bd3lm_proto::v1 as wire;
use serde::{Deserialize, Serialize};

use crate::registry::{Registry, check_name};
use crate::{Error, Result};

/// Where a job's weights start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// A new network of this size.
    Shape(Backbone),
    /// A published version's weights.
    FineTune {
        /// The model's name.
        name: String,
        /// The version, resolved at submission.
        version: u64,
    },
}

/// A validated job specification (see `training.proto` for each field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The prepared shards, as an absolute path on the shared storage.
    pub data: PathBuf,
    /// Where the weights start.
    pub init: Init,
    /// Block size L' of the trained model.
    pub block_size: usize,
    /// What the run does.
    #[serde(flatten)]
    pub recipe: Recipe,
    /// Registry name of the result.
    pub publish_as: String,
    /// Publish at every save too.
    pub publish_each_save: bool,
}

/// What a deployment lets one job ask for (the coordinator's `--max-job-*` flags). A job
/// beyond a bound is refused at submission, INVALID_ARGUMENT naming the field and the
/// limit, and counted in `bd3lm_limit_refusals_total{limit="job_<field>"}`. The
/// defaults fit a shared cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobBounds {
    /// Most parameters of the network (estimated from its shape).
    pub max_params: u64,
    /// Most training steps.
    pub max_steps: u64,
    /// Most rows one step trains on: batch size x accumulation x world size.
    pub max_rows_per_step: u64,
    /// Most data-parallel ranks.
    pub max_world_size: u32,
    /// Most saves (resume states written) over the run.
    pub max_saves: u64,
    /// Most versions one job publishes (with `publish_each_save`, one per save).
    pub max_published: u64,
}

impl Default for JobBounds {
    fn default() -> Self {
        Self {
            max_params: 2_000_000_000,
            max_steps: 2_000_000,
            max_rows_per_step: 4096,
            max_world_size: 8,
            max_saves: 100_000,
            max_published: 20,
        }
    }
}

impl JobBounds {
    /// Checks a validated `spec` whose network is `config` against the bounds.
    fn check(&self, spec: &JobSpec, config: &Config) -> Result<()> {
        let r = &spec.recipe;
        let saves = r.steps.div_ceil(r.save_every);
        let published = if spec.publish_each_save { saves } else { 1 };
        let rows = (r.batch_size * r.accumulate) as u64 * u64::from(r.world_size);
        let checks = [
            (
                "shape",
                estimated_params(config),
                self.max_params,
                "parameters",
            ),
            ("steps", r.steps, self.max_steps, "steps"),
            (
                "batch_size",
                rows,
                self.max_rows_per_step,
                "rows per step (batch size x accumulate x world size)",
            ),
            (
                "world_size",
                u64::from(r.world_size),
                u64::from(self.max_world_size),
                "ranks",
            ),
            ("save_every", saves, self.max_saves, "saves"),
            (
                "publish_each_save",
                published,
                self.max_published,
                "published versions",
            ),
        ];
        for (field, found, limit, what) in checks {
            if found > limit {
                refused_by(field);
                return Err(Error::invalid(
                    field,
                    format!("the job asks for {found} {what}, over this server's limit of {limit}"),
                ));
            }
        }
        Ok(())
    }
}

/// Counts a job refused by bound `field`.
fn refused_by(field: &'static str) {
    metrics::counter!("bd3lm_limit_refusals_total", "limit" => format!("job_{field}")).increment(1);
}

/// The parameters of `config`'s network, estimated from its shape: the token embedding
/// and output layer, and per block attention, the MLP (4x) and the adaLN modulation.
pub fn estimated_params(config: &Config) -> u64 {
    let (d, v, c) = (
        config.hidden_dim as u64,
        config.vocab_size as u64,
        config.cond_dim as u64,
    );
    let per_block = 12 * d * d + 6 * d * c;
    (2 * v * d).saturating_add((config.n_blocks as u64).saturating_mul(per_block))
}

/// Largest rows per micro-batch and micro-batches per step a job may ask for.
const MAX_BATCH: u32 = 4096;

/// Most data-parallel ranks of one job (the devices of one trainer).
const MAX_WORLD: u32 = 64;

/// The network of a new run on `index`'s data: its vocabulary, mask and row length, with
/// the given backbone and block size.
pub fn scratch_config(
    index: &ShardIndex,
    backbone: Backbone,
    block_size: usize,
) -> bd3lm_config::Result<Config> {
    let mut config = Config::new(Shape {
        vocab_size: index.vocab_size,
        model_length: index.row_length,
        block_size,
        backbone,
    });
    if index.mask_id as usize != index.vocab_size - 1 {
        config.mask_token_id = Some(index.mask_id);
    }
    config.validate()?;
    Ok(config)
}

impl JobSpec {
    /// Validates `spec` and fills in its defaults. `data_root` is where every `data` must
    /// lie (relative paths are resolved against it): a root is required, since without
    /// one a caller could point a job at any directory the trainers can read. The
    /// registry resolves the model to fine-tune and the versions already published under
    /// `publish_as`.
    pub async fn validate(
        spec: wire::JobSpec,
        data_root: &Path,
        registry: &Registry,
    ) -> Result<Self> {
        Self::validate_within(spec, data_root, registry, &JobBounds::default()).await
    }

    /// [`JobSpec::validate`] against `bounds`.
    pub async fn validate_within(
        spec: wire::JobSpec,
        data_root: &Path,
        registry: &Registry,
        bounds: &JobBounds,
    ) -> Result<Self> {
        let data = resolve_data(&spec.data, data_root)?;
        let index = ShardIndex::open(&data).map_err(|e| {
            tracing::debug!(error = %e, "a job's data did not open");
            unusable_data()
        })?;
        let (init, config) = match &spec.init {
            Some(wire::job_spec::Init::Shape(shape)) => shape_init(shape, &index, spec.block_size)?,
            Some(wire::job_spec::Init::FineTune(model)) => {
                fine_tune_init(model, &index, spec.block_size, registry).await?
            }
            None => return Err(Error::invalid("init", "set shape or fine_tune")),
        };
        check_name("publish_as", &spec.publish_as)?;
        check_successor(&spec.publish_as, &config, registry).await?;
        let recipe = recipe(&spec)?;
        let valid = Self {
            data,
            init,
            block_size: config.block_size,
            recipe,
            publish_as: spec.publish_as,
            publish_each_save: spec.publish_each_save,
        };
        bounds.check(&valid, &config)?;
        Ok(valid)
    }

    /// The specification as the API shows it.
    pub fn to_wire(&self) -> wire::JobSpec {
        let init = match &self.init {
            Init::Shape(backbone) => wire::job_spec::Init::Shape(wire_shape(backbone)),
            Init::FineTune { name, version } => wire::job_spec::Init::FineTune(wire::ModelRef {
                name: name.clone(),
                version: Some(*version),
            }),
        };
        wire::JobSpec {
            data: self.data.display().to_string(),
            init: Some(init),
            block_size: Some(self.block_size as u32),
            publish_as: self.publish_as.clone(),
            publish_each_save: self.publish_each_save,
            ..wire_recipe(&self.recipe)
        }
    }
}

/// `backbone` as the API shows it.
pub fn wire_shape(backbone: &Backbone) -> wire::ModelShape {
    wire::ModelShape {
        hidden_dim: backbone.hidden_dim as u32,
        n_heads: backbone.n_heads as u32,
        n_blocks: backbone.n_blocks as u32,
        cond_dim: backbone.cond_dim as u32,
    }
}

/// A wire specification holding `recipe` and nothing else: the rest of a job is filled in
/// around it.
pub fn wire_recipe(r: &Recipe) -> wire::JobSpec {
    let decay = match r.decay {
        Decay::Constant => wire::Decay::Constant,
        Decay::Cosine => wire::Decay::Cosine,
    };
    wire::JobSpec {
        steps: r.steps,
        learning_rate: Some(wire::LearningRate {
            peak: Some(r.lr),
            warmup_steps: Some(r.warmup),
            decay: decay as i32,
        }),
        batch_size: Some(r.batch_size as u32),
        accumulate: Some(r.accumulate as u32),
        seed: r.seed,
        val_every: r.val_every,
        val_batches: Some(r.val_batches as u32),
        save_every: Some(r.save_every),
        ema: Some(r.ema),
        grad_clip: Some(r.grad_clip),
        no_clip_search: !r.clip_search,
        world_size: Some(r.world_size),
        ..Default::default()
    }
}

/// The recipe of `spec`, its defaults filled in.
fn recipe(spec: &wire::JobSpec) -> Result<Recipe> {
    let lr = spec.learning_rate.unwrap_or_default();
    Ok(Recipe {
        steps: positive("steps", spec.steps)?,
        lr: checked(
            "learning_rate.peak",
            lr.peak.unwrap_or(3e-4),
            |v| v > 0.0,
            "must be positive",
        )?,
        warmup: lr.warmup_steps.unwrap_or(2500.min(spec.steps / 10)),
        decay: match wire::Decay::try_from(lr.decay) {
            Ok(wire::Decay::Unspecified | wire::Decay::Constant) => Decay::Constant,
            Ok(wire::Decay::Cosine) => Decay::Cosine,
            Err(_) => return Err(Error::invalid("learning_rate.decay", "unknown decay")),
        },
        batch_size: bounded("batch_size", spec.batch_size.unwrap_or(8))?,
        accumulate: bounded("accumulate", spec.accumulate.unwrap_or(1))?,
        seed: spec.seed,
        val_every: spec.val_every,
        val_batches: bounded("val_batches", spec.val_batches.unwrap_or(8))?,
        save_every: positive("save_every", spec.save_every.unwrap_or(50))?.min(spec.steps),
        ema: checked(
            "ema",
            spec.ema.unwrap_or(0.9999),
            |v| (0.0..1.0).contains(&v),
            "must be in [0, 1)",
        )?,
        grad_clip: checked(
            "grad_clip",
            spec.grad_clip.unwrap_or(1.0),
            |v| v > 0.0,
            "must be positive",
        )?,
        clip_search: !spec.no_clip_search,
        world_size: match spec.world_size.unwrap_or(1) {
            w @ 1..=MAX_WORLD => w,
            _ => {
                return Err(Error::invalid(
                    "world_size",
                    format!("must be 1 to {MAX_WORLD}"),
                ));
            }
        },
    })
}

/// The data directory of `given` (a path or a `file://` URI), inside `root` when set.
fn resolve_data(given: &str, root: &Path) -> Result<PathBuf> {
    if given.is_empty() {
        return Err(Error::invalid(
            "data",
            "required: a prepared shard directory",
        ));
    }
    let path = match given.split_once("://") {
        Some(("file", path)) => path,
        Some(_) => {
            return Err(Error::invalid(
                "data",
                "only paths and file:// URIs are supported",
            ));
        }
        None => given,
    };
    // An absolute path replaces the root in the join, and is held to it below.
    let resolved = root
        .join(path)
        .canonicalize()
        .map_err(|_| unusable_data())?;
    // Symbolic links and `..` resolved first: no path leaves the root.
    let root = root.canonicalize().map_err(|_| unusable_data())?;
    if !resolved.starts_with(&root) {
        return Err(unusable_data());
    }
    Ok(resolved)
}

/// The one answer for a data path that cannot be used, whether it does not exist, lies
/// outside the data root or holds no shards: distinct answers would let a caller map the
/// trainers' file system.
fn unusable_data() -> Error {
    Error::invalid(
        "data",
        "not a prepared shard directory under the training data root (see bd3lm prepare-data)",
    )
}

fn shape_init(
    shape: &wire::ModelShape,
    index: &ShardIndex,
    block_size: Option<u32>,
) -> Result<(Init, Config)> {
    let dims = [
        shape.hidden_dim,
        shape.n_heads,
        shape.n_blocks,
        shape.cond_dim,
    ];
    if dims.contains(&0) {
        return Err(Error::invalid("shape", "every dimension must be positive"));
    }
    let backbone = Backbone {
        hidden_dim: shape.hidden_dim as usize,
        n_heads: shape.n_heads as usize,
        n_blocks: shape.n_blocks as usize,
        cond_dim: shape.cond_dim as usize,
    };
    let block_size = block_size.unwrap_or(4) as usize;
    let config = scratch_config(index, backbone, block_size)
        .map_err(|e| Error::invalid("shape", e.to_string()))?;
    Ok((Init::Shape(backbone), config))
}

async fn fine_tune_init(
    model: &wire::ModelRef,
    index: &ShardIndex,
    block_size: Option<u32>,
    registry: &Registry,
) -> Result<(Init, Config)> {
    check_name("fine_tune.name", &model.name)?;
    let versions = registry.versions(&model.name).await?;
    let found = match model.version {
        Some(v) => versions.into_iter().find(|m| m.version == v),
        None => versions.into_iter().last(),
    };
    let Some(from) = found else {
        let what = match model.version {
            Some(v) => format!("model {} has no version {v}", model.name),
            None => format!("no model {} in the registry", model.name),
        };
        return Err(Error::invalid("fine_tune", what));
    };
    let mut config = from.config.clone();
    if let Some(bs) = block_size {
        config.block_size = bs as usize;
    }
    config
        .validate()
        .map_err(|e| Error::invalid("block_size", e.to_string()))?;
    let fits = index.row_length == config.model_length
        && index.vocab_size <= config.vocab_size
        && index.mask_id == config.mask_id();
    if !fits {
        return Err(Error::invalid(
            "data",
            format!(
                "rows of {} tokens over {} ids (mask {}) do not fit {} version {}: {} tokens over {} ids (mask {})",
                index.row_length,
                index.vocab_size,
                index.mask_id,
                model.name,
                from.version,
                config.model_length,
                config.vocab_size,
                config.mask_id()
            ),
        ));
    }
    let init = Init::FineTune {
        name: model.name.clone(),
        version: from.version,
    };
    Ok((init, config))
}

/// Versions of one name are interchangeable for the denoise workers that follow it: the
/// same vocabulary, context length and block size.
async fn check_successor(name: &str, config: &Config, registry: &Registry) -> Result<()> {
    let Some(latest) = registry.versions(name).await?.pop() else {
        return Ok(());
    };
    let (a, b) = (&latest.config, config);
    if (a.vocab_size, a.model_length, a.block_size) != (b.vocab_size, b.model_length, b.block_size)
    {
        return Err(Error::invalid(
            "publish_as",
            format!(
                "{name} has vocabulary {}, context {} and block size {}; this job's model has {}, {} and {}",
                a.vocab_size,
                a.model_length,
                a.block_size,
                b.vocab_size,
                b.model_length,
                b.block_size
            ),
        ));
    }
    Ok(())
}

fn positive(field: &'static str, v: u64) -> Result<u64> {
    if v == 0 {
        return Err(Error::invalid(field, "must be at least 1"));
    }
    Ok(v)
}

fn bounded(field: &'static str, v: u32) -> Result<usize> {
    if !(1..=MAX_BATCH).contains(&v) {
        return Err(Error::invalid(field, format!("must be 1 to {MAX_BATCH}")));
    }
    Ok(v as usize)
}

fn checked(field: &'static str, v: f64, ok: impl Fn(f64) -> bool, why: &str) -> Result<f64> {
    if !(v.is_finite() && ok(v)) {
        return Err(Error::invalid(field, format!("{why}, found {v}")));
    }
    Ok(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::tests::{checkpoint, tiny};
    use bd3lm_kvstore::{JobStore, StoreConfig};
    use bd3lm_training::test_util::{counting_docs, shards};

    pub(crate) fn spec(data: &Path) -> wire::JobSpec {
        wire::JobSpec {
            data: data.display().to_string(),
            init: Some(wire::job_spec::Init::Shape(wire::ModelShape {
                hidden_dim: 32,
                n_heads: 2,
                n_blocks: 2,
                cond_dim: 16,
            })),
            steps: 40,
            publish_as: "tiny".into(),
            ..Default::default()
        }
    }

    /// A minimal spec gets the documented defaults, and the data path comes back
    /// absolute and resolved.
    #[tokio::test]
    async fn defaults_are_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let registry = Registry::records(JobStore::memory(StoreConfig::default()));
        let valid = JobSpec::validate(spec(&data), dir.path(), &registry)
            .await
            .unwrap();
        assert_eq!(valid.data, data.canonicalize().unwrap());
        let r = &valid.recipe;
        assert_eq!((valid.block_size, r.batch_size, r.accumulate), (4, 8, 1));
        assert_eq!((r.warmup, r.save_every, r.val_batches), (4, 40, 8));
        assert_eq!((r.lr, r.ema, r.grad_clip), (3e-4, 0.9999, 1.0));
        assert!(r.clip_search && r.world_size == 1);
        let round = JobSpec::validate(valid.to_wire(), dir.path(), &registry)
            .await
            .unwrap();
        assert_eq!(round, valid, "the spec as shown submits the same job");
    }

    /// Each bad field is refused with its name, before anything is queued.
    #[tokio::test]
    async fn bad_specs_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let store = JobStore::memory(StoreConfig::default());
        let registry = Registry::new(store, dir.path().join("registry"));
        let ckpt = checkpoint(&dir.path().join("bs8"), &tiny(8), 3);
        registry
            .publish(&ckpt, "bs8", "j", Default::default())
            .await
            .unwrap();
        type Change = Box<dyn Fn(&mut wire::JobSpec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("data", Box::new(|s| s.data.clear())),
            ("data", Box::new(|s| s.data = "/nonexistent/shards".into())),
            ("data", Box::new(|s| s.data = "relative/shards".into())),
            ("data", Box::new(|s| s.data = "s3://bucket/shards".into())),
            ("data", Box::new(|s| s.data = "/tmp".into())),
            ("init", Box::new(|s| s.init = None)),
            (
                "shape",
                Box::new(|s| {
                    s.init = Some(wire::job_spec::Init::Shape(wire::ModelShape {
                        hidden_dim: 30,
                        n_heads: 4,
                        n_blocks: 2,
                        cond_dim: 16,
                    }))
                }),
            ),
            ("shape", Box::new(|s| s.block_size = Some(5))),
            (
                "learning_rate.peak",
                Box::new(|s| {
                    s.learning_rate = Some(wire::LearningRate {
                        peak: Some(-1e-3),
                        ..Default::default()
                    })
                }),
            ),
            ("steps", Box::new(|s| s.steps = 0)),
            ("batch_size", Box::new(|s| s.batch_size = Some(0))),
            ("ema", Box::new(|s| s.ema = Some(1.0))),
            (
                "publish_as",
                Box::new(|s| s.publish_as = "no/slashes".into()),
            ),
            // The registry's set of names lives at the key a model called so would use.
            ("publish_as", Box::new(|s| s.publish_as = "names".into())),
            ("publish_as", Box::new(|s| s.publish_as = "bs8".into())),
            (
                "fine_tune",
                Box::new(|s| {
                    s.init = Some(wire::job_spec::Init::FineTune(wire::ModelRef {
                        name: "unknown".into(),
                        version: None,
                    }))
                }),
            ),
            (
                "fine_tune",
                Box::new(|s| {
                    s.init = Some(wire::job_spec::Init::FineTune(wire::ModelRef {
                        name: "bs8".into(),
                        version: Some(2),
                    }))
                }),
            ),
            ("world_size", Box::new(|s| s.world_size = Some(0))),
            ("world_size", Box::new(|s| s.world_size = Some(65))),
        ];
        for (field, change) in cases {
            let mut bad = spec(&data);
            change(&mut bad);
            let err = JobSpec::validate(bad, dir.path(), &registry)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { field: f, .. } if *f == field),
                "expected {field}, got {err}"
            );
        }
        let mut tune = spec(&data);
        tune.init = Some(wire::job_spec::Init::FineTune(wire::ModelRef {
            name: "bs8".into(),
            version: None,
        }));
        let valid = JobSpec::validate(tune, dir.path(), &registry)
            .await
            .unwrap();
        assert_eq!(
            valid.init,
            Init::FineTune {
                name: "bs8".into(),
                version: 1
            },
            "latest resolved"
        );
    }

    /// Each bound refuses a job past it, naming the field and the limit; a job within
    /// every bound passes.
    #[tokio::test]
    async fn each_bound_refuses_a_job_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let registry = Registry::records(JobStore::memory(StoreConfig::default()));
        let roomy = JobBounds::default();
        type Change = Box<dyn Fn(&mut wire::JobSpec, &mut JobBounds)>;
        let cases: Vec<(&str, Change)> = vec![
            ("shape", Box::new(|_, b| b.max_params = 1_000)),
            ("steps", Box::new(|_, b| b.max_steps = 10)),
            ("batch_size", Box::new(|_, b| b.max_rows_per_step = 4)),
            (
                "world_size",
                Box::new(|s, b| {
                    s.world_size = Some(2);
                    b.max_world_size = 1;
                }),
            ),
            (
                "save_every",
                Box::new(|s, b| {
                    s.save_every = Some(10);
                    b.max_saves = 2;
                }),
            ),
            (
                "publish_each_save",
                Box::new(|s, b| {
                    s.publish_each_save = true;
                    s.save_every = Some(10);
                    b.max_published = 1;
                }),
            ),
        ];
        for (field, change) in cases {
            let (mut bad, mut bounds) = (spec(&data), roomy);
            change(&mut bad, &mut bounds);
            let err = JobSpec::validate_within(bad, dir.path(), &registry, &bounds)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, Error::Invalid { field: f, .. } if *f == field),
                "expected {field}, got {err}"
            );
            assert!(err.to_string().contains("limit of"), "{err}");
        }
        JobSpec::validate_within(spec(&data), dir.path(), &registry, &roomy)
            .await
            .unwrap();
    }

    /// A data path that does not exist, one outside the data root and a directory without
    /// shards get the same answer: nothing tells a caller which paths exist.
    #[tokio::test]
    async fn every_unusable_data_path_gets_one_answer() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let (data, _) = shards(&root, &counting_docs(12, 50), 16, 4);
        let outside = dir.path().join("outside");
        shards(&outside, &counting_docs(12, 50), 16, 4);
        let plain = root.join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        let registry = Registry::records(JobStore::memory(StoreConfig::default()));
        let mut answers = Vec::new();
        for path in [root.join("missing"), outside, plain] {
            let mut bad = spec(&data);
            bad.data = path.display().to_string();
            let err = JobSpec::validate(bad, &root, &registry).await.unwrap_err();
            answers.push(err.to_string());
        }
        assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
        assert!(answers[0].starts_with("data:"), "{answers:?}");
    }

    /// With a data root, relative paths resolve inside it and no path leaves it.
    #[tokio::test]
    async fn data_stays_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let registry = Registry::records(JobStore::memory(StoreConfig::default()));
        let root = dir.path();
        let mut relative = spec(Path::new("shards"));
        let valid = JobSpec::validate(relative.clone(), root, &registry).await;
        assert_eq!(valid.unwrap().data, data.canonicalize().unwrap());
        relative.data = "shards/../../".into();
        let err = JobSpec::validate(relative, root, &registry)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("under the training data root"),
            "{err}"
        );
    }
}
