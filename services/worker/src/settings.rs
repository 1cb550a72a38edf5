//! The worker's settings: flag groups shared by the deployment binary and the `bd3lm`
//! command line, every flag also an environment variable.

use std::str::FromStr;

use candle_core::{DType, Device};

/// Default memory budget of the session KV caches a worker keeps.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// How much a worker takes on.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct WorkerSettings {
    /// Blocks denoised at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BD3LM_WORKER_CAPACITY", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,
    /// Bytes of session KV caches kept in memory (allocated buffers, not only live keys
    /// and values).
    #[arg(long, env = "BD3LM_WORKER_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub cache_bytes: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            capacity: 2,
            cache_bytes: DEFAULT_CACHE_BYTES,
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

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (CUDA; candle's CPU matmul has none).
    Bf16,
}

/// Where and in what precision the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct DeviceArgs {
    /// Where the model runs: cpu, cuda (the first GPU) or cuda:N (a build with
    /// `--features cuda`).
    #[arg(long, env = "BD3LM_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute precision.
    #[arg(long, env = "BD3LM_DTYPE", value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
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

    /// The candle dtype.
    pub fn dtype(&self) -> DType {
        match self.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
