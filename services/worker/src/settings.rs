//! The worker's settings: flag groups shared by the deployment binary and the `bd3lm`
//! command line, every flag also an environment variable.

use std::str::FromStr;

use candle_core::{DType, Device};

/// Default memory budget of the session KV caches a worker keeps.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// How much a worker takes on. Limits left unset are derived from the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct WorkerSettings {
    /// Sessions denoised together in one batch, which is also the blocks the worker takes
    /// at once (more are refused with RESOURCE_EXHAUSTED). Default: 16 on the CPU, 128 on
    /// CUDA.
    #[arg(long, visible_alias = "capacity", env = "BD3LM_MAX_BATCH",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: Option<u32>,
    /// Most token rows in one forward pass; a session's block counts its block size.
    /// Default: 512 on the CPU, 16384 on CUDA.
    #[arg(long, env = "BD3LM_MAX_BATCH_ROWS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_rows: Option<u32>,
    /// Bytes of KV caches in the running batch; a block that would go past it waits for
    /// room. Default: a quarter of the machine's memory on the CPU, 60% of the GPU's on
    /// CUDA (8 GiB when it cannot be read).
    #[arg(long, env = "BD3LM_KV_BUDGET_BYTES")]
    pub kv_budget_bytes: Option<u64>,
    /// Bytes of session KV caches kept in memory between blocks (allocated buffers, not
    /// only live keys and values). Default: 1 GiB.
    #[arg(long, env = "BD3LM_WORKER_CACHE_BYTES")]
    pub cache_bytes: Option<usize>,
    /// Whether new sessions take the keys and values of the first prompt blocks they
    /// share with earlier prompts (same weights, same tokens up to the block's end) from
    /// the worker's prefix cache instead of computing them: the same bits, so the same
    /// tokens. Default: true.
    #[arg(long, env = "BD3LM_PREFIX_CACHE", value_name = "BOOL")]
    pub prefix_cache: Option<bool>,
    /// Bytes of prompt blocks' KV blobs the prefix cache keeps (least recently used out
    /// first). Default: a quarter of --cache-bytes.
    #[arg(long, env = "BD3LM_PREFIX_CACHE_BYTES")]
    pub prefix_cache_bytes: Option<usize>,
}

/// Where a worker's model comes from when it follows the registry.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct FollowSettings {
    /// Serve the latest published version of this registry model, and each new one as it
    /// is published (a worker: instead of --checkpoint; `bd3lm serve`: beside its
    /// checkpoint, repeated for several models).
    #[arg(long, env = "BD3LM_MODEL", value_name = "NAME", value_delimiter = ',')]
    pub model: Vec<String>,
    /// The model registry's storage (published versions are `{dir}/{name}/{version}`).
    #[arg(long, env = "BD3LM_REGISTRY_DIR", value_name = "DIR")]
    pub registry_dir: Option<std::path::PathBuf>,
    /// Seconds a superseded version stays loaded for the sessions that began on it; they
    /// move to the latest version (their KV state rebuilt) after it.
    #[arg(long = "rollout-grace-secs", env = "BD3LM_ROLLOUT_GRACE_SECS", value_name = "SECS",
          default_value = "600", value_parser = bd3lm_telemetry::cli::positive_secs)]
    pub grace: std::time::Duration,
    /// A superseded version that served no block for this many seconds goes earlier.
    #[arg(long = "rollout-idle-secs", env = "BD3LM_ROLLOUT_IDLE_SECS", value_name = "SECS",
          default_value = "60", value_parser = bd3lm_telemetry::cli::positive_secs)]
    pub idle: std::time::Duration,
    /// Seconds between looks at the registry for a new version.
    #[arg(long = "registry-poll-secs", env = "BD3LM_REGISTRY_POLL_SECS", value_name = "SECS",
          default_value = "5", value_parser = bd3lm_telemetry::cli::positive_secs)]
    pub poll: std::time::Duration,
}

impl FollowSettings {
    /// How long superseded versions stay.
    pub fn rollout(&self) -> crate::Rollout {
        crate::Rollout {
            grace: self.grace,
            idle: self.idle,
        }
    }
}

/// A worker's limits, resolved for its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimits {
    /// Sessions in one batch (and blocks taken at once).
    pub max_batch: usize,
    /// Token rows in one forward pass.
    pub max_rows: usize,
    /// Bytes of KV caches in the running batch.
    pub kv_budget: u64,
    /// Bytes of session caches kept between blocks.
    pub cache_bytes: usize,
    /// Bytes of the shared prefix cache (0: none).
    pub prefix_bytes: usize,
}

impl WorkerSettings {
    /// The limits on `device`: what was set, else the device's defaults.
    pub fn limits(&self, device: DeviceSpec) -> WorkerLimits {
        let (batch, rows, share) = match device {
            DeviceSpec::Cpu => (16, 512, 0.25),
            DeviceSpec::Cuda(_) => (128, 16384, 0.6),
        };
        let kv_budget = self.kv_budget_bytes.unwrap_or_else(|| {
            memory_bytes(device).map_or(DEFAULT_KV_BUDGET, |m| (m as f64 * share) as u64)
        });
        let cache_bytes = self.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES);
        let prefix_bytes = match self.prefix_cache {
            Some(false) => 0,
            _ => self.prefix_cache_bytes.unwrap_or(cache_bytes / 4),
        };
        WorkerLimits {
            max_batch: self.max_batch.map_or(batch, |b| b as usize),
            max_rows: self.max_batch_rows.map_or(rows, |r| r as usize),
            kv_budget,
            cache_bytes,
            prefix_bytes,
        }
    }
}

impl Default for WorkerLimits {
    fn default() -> Self {
        WorkerSettings::default().limits(DeviceSpec::Cpu)
    }
}

/// KV budget when the device's memory cannot be read.
const DEFAULT_KV_BUDGET: u64 = 8 << 30;

/// The device's memory: `MemTotal` of /proc/meminfo for the CPU, `nvidia-smi`'s total for
/// a GPU; `None` when it cannot be read.
fn memory_bytes(device: DeviceSpec) -> Option<u64> {
    match device {
        DeviceSpec::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        DeviceSpec::Cuda(n) => {
            let out = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
                .arg(format!("--id={n}"))
                .output()
                .ok()?;
            let mib: u64 = String::from_utf8(out.stdout).ok()?.trim().parse().ok()?;
            Some(mib << 20)
        }
    }
}

/// A device as flags name it: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA GPU number N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected cpu, cuda or cuda:N, found {s:?}")),
        }
    }
}

/// A precision as flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (to compute in: CUDA only, candle's CPU matmul has none; KV caches hold it
    /// on either).
    Bf16,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Where and in what precisions the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct DeviceArgs {
    /// Where the model runs: cpu, cuda (the first GPU) or cuda:N (a build with
    /// `--features cuda`).
    #[arg(long, env = "BD3LM_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute precision.
    #[arg(long, env = "BD3LM_DTYPE", value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Precision of the KV caches, in memory and in the store's blobs: every worker of a
    /// deployment must use the same (a blob of another is a miss, rebuilt from tokens).
    /// Default: f32 on the CPU (the reference's parity), bf16 on CUDA (the reference's own
    /// cache there).
    #[arg(long, env = "BD3LM_KV_DTYPE", value_enum)]
    pub kv_dtype: Option<DtypeArg>,
}

/// The precisions a model runs in: its weights and activations, and its KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Weights and activations.
    pub compute: DType,
    /// Keys and values in the KV caches, in memory and in the store.
    pub kv: DType,
}

impl Precision {
    /// f32 throughout: the reference's parity.
    pub const F32: Self = Self {
        compute: DType::F32,
        kv: DType::F32,
    };

    /// The network of `ckpt` in these precisions on `device`.
    pub fn load_model(
        self,
        ckpt: bd3lm_model::checkpoint::Checkpoint,
        device: &Device,
    ) -> bd3lm_model::Result<bd3lm_model::Bd3lm> {
        ckpt.load_model(self.compute, device)?
            .with_kv_dtype(self.kv)
    }
}

/// A dtype's name as flags and `InfoResponse` write it: "f32", "bf16", "f16".
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

impl DeviceArgs {
    /// The candle device; an error when CUDA is asked for and absent.
    pub fn device(&self) -> anyhow::Result<Device> {
        match self.device {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))
            }
        }
    }

    /// The compute and KV precisions, the KV's default resolved for the device.
    pub fn precision(&self) -> Precision {
        self.precision_or(match self.device {
            DeviceSpec::Cpu => DType::F32,
            DeviceSpec::Cuda(_) => DType::BF16,
        })
    }

    /// The compute and KV precisions, the KV's default the compute dtype: what a parity
    /// check against the reference runs in unless told otherwise.
    pub fn exact_precision(&self) -> Precision {
        self.precision_or(self.dtype.dtype())
    }

    fn precision_or(&self, default_kv: DType) -> Precision {
        Precision {
            compute: self.dtype.dtype(),
            kv: self.kv_dtype.map_or(default_kv, DtypeArg::dtype),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_the_flags_else_the_device() {
        let cpu = WorkerSettings::default().limits(DeviceSpec::Cpu);
        assert_eq!((cpu.max_batch, cpu.max_rows), (16, 512));
        assert!(cpu.kv_budget > 0);
        // The prefix cache: on by default, a quarter of the session caches' budget.
        assert_eq!(cpu.prefix_bytes, cpu.cache_bytes / 4);
        let set = WorkerSettings {
            max_batch: Some(3),
            max_batch_rows: Some(40),
            kv_budget_bytes: Some(1000),
            cache_bytes: Some(10),
            prefix_cache: None,
            prefix_cache_bytes: Some(7),
        };
        let limits = set.limits(DeviceSpec::Cuda(0));
        assert_eq!(
            (
                limits.max_batch,
                limits.max_rows,
                limits.kv_budget,
                limits.cache_bytes,
                limits.prefix_bytes
            ),
            (3, 40, 1000, 10, 7)
        );
        let off = WorkerSettings {
            prefix_cache: Some(false),
            ..set
        };
        assert_eq!(off.limits(DeviceSpec::Cpu).prefix_bytes, 0);
    }

    #[test]
    fn devices_parse_or_name_what_was_wrong() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<DeviceSpec>().unwrap_err().contains(bad));
        }
    }
}
