//! The coordinator's settings: one flag group shared by the deployment binary and
//! `bd3lm serve`, every flag also an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use bd3lm_telemetry::cli::positive_secs;

use crate::dispatch::{RetryPolicy, StallBounds};
use bd3lm_jobs::spec::JobBounds;

use crate::lease::LeaseTerms;
use crate::validation::Limits;

/// How blocks of a session are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// To the worker that holds the session's cache when it is healthy, else the least
    /// loaded one.
    Affinity,
    /// Never to the worker of the session's previous block (when another is healthy),
    /// each block a run of its own: exercises cache transfer through the store.
    Rotate,
}

/// When a generation writes its session's KV state to the store (the tokens are always
/// written); what is not written is rebuilt from the tokens where it is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Persistence {
    /// Every committed block's KV blob, as it commits.
    EveryBlock,
    /// The window's blobs once, from the last block's worker, when the generation ends.
    AtEnd,
    /// Tokens only.
    Never,
}

impl Persistence {
    /// The wire's value.
    pub fn to_wire(self) -> bd3lm_proto::v1::KvPersistence {
        use bd3lm_proto::v1::KvPersistence;
        match self {
            Self::EveryBlock => KvPersistence::EveryBlock,
            Self::AtEnd => KvPersistence::AtEnd,
            Self::Never => KvPersistence::Never,
        }
    }

    /// The value of a request's `kv_persistence`: `None` when unspecified, an error for
    /// a value this server does not know.
    pub fn from_wire(value: i32) -> Result<Option<Self>, i32> {
        use bd3lm_proto::v1::KvPersistence;
        match KvPersistence::try_from(value) {
            Ok(KvPersistence::Unspecified) => Ok(None),
            Ok(KvPersistence::EveryBlock) => Ok(Some(Self::EveryBlock)),
            Ok(KvPersistence::AtEnd) => Ok(Some(Self::AtEnd)),
            Ok(KvPersistence::Never) => Ok(Some(Self::Never)),
            Err(_) => Err(value),
        }
    }

    /// The name metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Self::EveryBlock => "every_block",
            Self::AtEnd => "at_end",
            Self::Never => "never",
        }
    }
}

/// Settings of the coordinator.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct CoordinatorSettings {
    /// Request limits.
    #[command(flatten)]
    pub limits: Limits,
    /// Least seconds without any progress from a worker (a block or a heartbeat) before
    /// its run is taken for stalled and moved to another worker; the wait is four times
    /// the recent block time within this floor and the ceiling. Workers send heartbeats
    /// four times per floor while their batch advances.
    #[arg(long = "stall-floor-secs", env = "BD3LM_STALL_FLOOR_SECS", value_name = "SECS",
          default_value = "5", value_parser = positive_secs)]
    pub stall_floor: Duration,
    /// Most seconds without progress before a run is taken for stalled; also how long
    /// blocks wait when no worker has any capacity before UNAVAILABLE.
    #[arg(long = "stall-ceiling-secs", env = "BD3LM_STALL_CEILING_SECS", value_name = "SECS",
          default_value = "120", value_parser = positive_secs)]
    pub stall_ceiling: Duration,
    /// Most blocks one worker call runs for a session, keeping it in the worker's batch
    /// from one block to the next (1: a call per block). A run gives its slot up after
    /// its next block whenever other generations wait for one.
    #[arg(long, env = "BD3LM_MAX_RUN_BLOCKS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_run_blocks: u32,
    /// Generations that may be admitted beyond the workers' slots (each waits for one);
    /// new requests beyond it are refused with RESOURCE_EXHAUSTED (admitted generations
    /// always wait their turn).
    #[arg(long, env = "BD3LM_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Generations one API key may have running or queued at once; beyond it its new
    /// requests are refused with RESOURCE_EXHAUSTED (0: no limit).
    #[arg(long, env = "BD3LM_MAX_STREAMS_PER_KEY", default_value_t = 0)]
    pub max_streams_per_key: usize,
    /// Seconds a new generation's first block may wait for a worker slot before the
    /// request ends with RESOURCE_EXHAUSTED, before any token (default: no limit; a
    /// call's own gRPC deadline ends it with DEADLINE_EXCEEDED).
    #[arg(long = "max-queue-wait-secs", env = "BD3LM_MAX_QUEUE_WAIT_SECS", value_name = "SECS",
          value_parser = positive_secs)]
    pub max_queue_wait: Option<Duration>,
    /// Faulty attempts per block, all workers together (a busy worker is waited for).
    #[arg(long, env = "BD3LM_MAX_ATTEMPTS", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Routing of blocks to workers.
    #[arg(long, env = "BD3LM_ROUTING", value_enum, default_value_t = Routing::Affinity)]
    pub routing: Routing,
    /// When a generation writes its session's KV state to the store, unless its request
    /// says: every block (a worker's death costs a read of the window), at the end (a
    /// continuation reads the window; a death mid-generation costs a rebuild), or never
    /// (tokens only: every move and continuation elsewhere rebuilds).
    #[arg(long, env = "BD3LM_KV_PERSISTENCE", value_enum, default_value_t = Persistence::EveryBlock)]
    pub kv_persistence: Persistence,
    /// Seconds between worker discovery and health checks.
    #[arg(long = "health-interval-secs", env = "BD3LM_HEALTH_INTERVAL_SECS", value_name = "SECS",
          default_value = "1", value_parser = positive_secs)]
    pub health_interval: Duration,
    /// Health checks in a row without an answer before a worker is marked down (an answer
    /// other than SERVING, a worker loading or draining, marks it down at once).
    #[arg(long, env = "BD3LM_DOWN_AFTER_FAILURES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub down_after_failures: u32,
    /// Sessions whose worker is remembered for routing; the least recently used beyond
    /// this are forgotten (their next block goes to the least loaded worker).
    #[arg(long, env = "BD3LM_AFFINITY_SESSIONS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub affinity_sessions: u64,
    /// Send a new session to the worker that began a session with the longest whole-block
    /// prefix of its prompt (its keys and values are in that worker's memory) while that
    /// worker has room, else to the least loaded (under `--routing affinity`).
    #[arg(long, env = "BD3LM_PREFIX_ROUTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_routing: bool,
    /// Seconds a session's lease outlives its generation's last renewal (a coordinator
    /// that dies holds its sessions this long).
    #[arg(long = "lease-secs", env = "BD3LM_LEASE_SECS", value_name = "SECS",
          default_value = "30", value_parser = positive_secs)]
    pub lease_ttl: Duration,
    /// Seconds a generation waits for a session another generation holds before it is
    /// refused with ABORTED.
    #[arg(long = "lease-wait-secs", env = "BD3LM_LEASE_WAIT_SECS", value_name = "SECS",
          default_value = "2", value_parser = positive_secs)]
    pub lease_wait: Duration,
    /// File of the public API's keys, one per line (`authorization: Bearer <key>`),
    /// re-read on SIGHUP; a session belongs to the key that created it. Without it the
    /// API is open to every caller.
    #[arg(long = "api-keys", env = "BD3LM_API_KEYS_FILE", value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    /// Also serve the OpenAI-compatible HTTP API (`/v1/completions`,
    /// `/v1/chat/completions`, `/v1/models`) on this address, under the same API keys.
    #[arg(long = "http-addr", env = "BD3LM_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// Serve gRPC reflection (grpcurl's discovery) on the public port, behind the API
    /// keys when there are any.
    #[arg(long, env = "BD3LM_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,
    /// Directory every training job's data must lie under (relative `data` paths are
    /// resolved against it); the same storage the trainers mount. Without it SubmitJob
    /// is refused (FAILED_PRECONDITION): the training service takes jobs only when their
    /// data is confined.
    #[arg(long, env = "BD3LM_TRAINING_DATA_ROOT", value_name = "DIR")]
    pub training_data_root: Option<PathBuf>,
    /// What one training job may ask for, and how many one key may have.
    #[command(flatten)]
    pub jobs: JobLimits,
    /// WatchJob streams one API key (or the open API) may hold open at once; beyond it a
    /// watch is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BD3LM_MAX_WATCHES_PER_KEY", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_watches_per_key: u64,
    /// A WatchJob stream is woken by the store's change notifications; it also reads its
    /// job this often, which bounds how late a change missed by the notifications (the
    /// store's connection lost meanwhile) arrives.
    #[arg(long = "job-watch-poll-secs", env = "BD3LM_JOB_WATCH_POLL_SECS", value_name = "SECS",
          default_value = "5", value_parser = positive_secs)]
    pub job_watch_poll: Duration,
    /// tokenizer.json for text prompts, of every model without one of its own
    /// (`--model-tokenizer`); without either, a model's prompts must be token ids.
    #[arg(long, env = "BD3LM_TOKENIZER", value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// A model's own tokenizer, as MODEL=FILE (repeat the flag, or separate with commas
    /// in the variable), where the workers serve several models.
    #[arg(long = "model-tokenizer", env = "BD3LM_MODEL_TOKENIZERS", value_name = "MODEL=FILE",
          value_delimiter = ',', value_parser = parse_model_tokenizer)]
    pub model_tokenizers: Vec<(String, PathBuf)>,
    /// The model of a request that names none, where the workers serve several; with one
    /// model served, that one.
    #[arg(
        long = "default-model",
        env = "BD3LM_DEFAULT_MODEL",
        value_name = "MODEL"
    )]
    pub default_model: Option<String>,
    /// First pause between attempts at a block; it doubles with each attempt.
    #[arg(skip = Duration::from_millis(50))]
    pub retry_backoff: Duration,
}

impl CoordinatorSettings {
    /// The tokenizer of `model`: its own, else the shared one.
    pub fn tokenizer_of(&self, model: &str) -> Option<&std::path::Path> {
        let own = self.model_tokenizers.iter().find(|(m, _)| m == model);
        own.map(|(_, f)| f.as_path()).or(self.tokenizer.as_deref())
    }

    /// How each block is tried.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            stall: StallBounds {
                floor: self.stall_floor,
                ceiling: self.stall_ceiling.max(self.stall_floor),
            },
            max_attempts: self.max_attempts,
            backoff: self.retry_backoff,
            max_run_blocks: self.max_run_blocks,
            prefix_routing: self.prefix_routing,
        }
    }

    /// The terms of sessions' leases.
    pub fn lease_terms(&self) -> LeaseTerms {
        LeaseTerms {
            ttl: self.lease_ttl,
            wait: self.lease_wait,
        }
    }
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            stall_floor: Duration::from_secs(5),
            stall_ceiling: Duration::from_secs(120),
            max_run_blocks: 64,
            max_queue: 256,
            max_streams_per_key: 0,
            max_queue_wait: None,
            max_attempts: 6,
            routing: Routing::Affinity,
            kv_persistence: Persistence::EveryBlock,
            health_interval: Duration::from_secs(1),
            down_after_failures: 3,
            affinity_sessions: 100_000,
            prefix_routing: true,
            lease_ttl: Duration::from_secs(30),
            lease_wait: Duration::from_secs(2),
            api_keys: None,
            http_addr: None,
            reflection: true,
            training_data_root: None,
            max_watches_per_key: 16,
            job_watch_poll: Duration::from_secs(5),
            jobs: JobLimits::default(),
            tokenizer: None,
            model_tokenizers: Vec::new(),
            default_model: None,
            retry_backoff: Duration::from_millis(50),
        }
    }
}

/// Parses MODEL=FILE.
fn parse_model_tokenizer(given: &str) -> Result<(String, PathBuf), String> {
    match given.split_once('=') {
        Some((model, file)) if !model.is_empty() && !file.is_empty() => {
            Ok((model.to_string(), PathBuf::from(file)))
        }
        _ => Err("expected MODEL=FILE".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: CoordinatorSettings,
    }

    /// The flags' defaults and `Default` agree, and bad durations are refused by clap.
    #[test]
    fn flag_defaults_are_the_defaults() {
        let parsed = Cli::try_parse_from(["c"]).unwrap().settings;
        assert_eq!(parsed, CoordinatorSettings::default());
        for bad in ["0", "-1", "nan"] {
            assert!(Cli::try_parse_from(["c", "--health-interval-secs", bad]).is_err());
            assert!(Cli::try_parse_from(["c", "--stall-floor-secs", bad]).is_err());
            assert!(Cli::try_parse_from(["c", "--max-run-blocks", bad]).is_err());
        }
    }
}

/// The training service's limits on jobs (see [`JobBounds`]); each refusal names its
/// field and limit.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct JobLimits {
    /// Most parameters of a job's network (estimated from its shape).
    #[arg(long, env = "BD3LM_MAX_JOB_PARAMS", default_value_t = JobBounds::default().max_params)]
    pub max_job_params: u64,
    /// Most training steps of a job.
    #[arg(long, env = "BD3LM_MAX_JOB_STEPS", default_value_t = JobBounds::default().max_steps)]
    pub max_job_steps: u64,
    /// Most rows one step of a job trains on (batch size x accumulate x world size).
    #[arg(long, env = "BD3LM_MAX_JOB_ROWS_PER_STEP",
          default_value_t = JobBounds::default().max_rows_per_step)]
    pub max_job_rows_per_step: u64,
    /// Most data-parallel ranks of a job (at most the trainers' devices).
    #[arg(long, env = "BD3LM_MAX_JOB_WORLD_SIZE",
          default_value_t = JobBounds::default().max_world_size)]
    pub max_job_world_size: u32,
    /// Most saves over a job's run.
    #[arg(long, env = "BD3LM_MAX_JOB_SAVES", default_value_t = JobBounds::default().max_saves)]
    pub max_job_saves: u64,
    /// Most versions one job publishes.
    #[arg(long, env = "BD3LM_MAX_JOB_PUBLISHED",
          default_value_t = JobBounds::default().max_published)]
    pub max_job_published: u64,
    /// Jobs one API key may have queued or running at once.
    #[arg(long, env = "BD3LM_MAX_JOBS_PER_KEY", default_value_t = 4)]
    pub max_jobs_per_key: usize,
    /// Seconds an ended job's record is kept; older ones are deleted (default 30 days).
    #[arg(long = "job-retention-secs", env = "BD3LM_JOB_RETENTION_SECS", value_name = "SECS",
          default_value = "2592000", value_parser = positive_secs)]
    pub job_retention: Duration,
}

impl JobLimits {
    /// The bounds of one job.
    pub fn bounds(&self) -> JobBounds {
        JobBounds {
            max_params: self.max_job_params,
            max_steps: self.max_job_steps,
            max_rows_per_step: self.max_job_rows_per_step,
            max_world_size: self.max_job_world_size,
            max_saves: self.max_job_saves,
            max_published: self.max_job_published,
        }
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        let b = JobBounds::default();
        Self {
            max_job_params: b.max_params,
            max_job_steps: b.max_steps,
            max_job_rows_per_step: b.max_rows_per_step,
            max_job_world_size: b.max_world_size,
            max_job_saves: b.max_saves,
            max_job_published: b.max_published,
            max_jobs_per_key: 4,
            job_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}
