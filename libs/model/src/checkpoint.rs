//! Checkpoints in the published Hugging Face layout.
//!
//! A checkpoint is a directory with `config.json` and either `model.safetensors` or a
//! sharded `model.safetensors.index.json` naming its shard files. Tensors are memory-mapped
//! and converted to the requested dtype on load; f32, bf16 and f16 on disk all work.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub use bd3lm_config::checkpoint::{CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE};
use bd3lm_config::checkpoint::{read_config, weight_files};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use safetensors::Dtype as StDtype;

use crate::layers::FREQUENCY_EMBEDDING_SIZE;
use crate::{Bd3lm, Config, Error, Result};

/// Names of the top-level scalars holding the learned clipped noise interval.
pub const EPS_TENSORS: [&str; 2] = ["sampling_eps_min", "sampling_eps_max"];
/// Buffer of the reference's rotary module: stored by some checkpoints, always recomputed.
const INV_FREQ_TENSOR: &str = "backbone.rotary_emb.inv_freq";

/// Every tensor the network of `cfg` needs, with its shape, in the published names.
pub fn tensor_specs(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (d, c, v) = (cfg.hidden_dim, cfg.cond_dim, cfg.vocab_size);
    let mut specs = vec![("backbone.vocab_embed.embedding".to_string(), vec![v, d])];
    let mut add = |name: String, shape: Vec<usize>| specs.push((format!("backbone.{name}"), shape));
    if cfg.adaln {
        add(
            "sigma_map.mlp.0.weight".into(),
            vec![c, FREQUENCY_EMBEDDING_SIZE],
        );
        add("sigma_map.mlp.0.bias".into(), vec![c]);
        add("sigma_map.mlp.2.weight".into(), vec![c, c]);
        add("sigma_map.mlp.2.bias".into(), vec![c]);
    }
    for i in 0..cfg.n_blocks {
        let p = format!("blocks.{i}");
        add(format!("{p}.norm1.weight"), vec![d]);
        add(format!("{p}.attn_qkv.weight"), vec![3 * d, d]);
        add(format!("{p}.attn_out.weight"), vec![d, d]);
        add(format!("{p}.norm2.weight"), vec![d]);
        add(format!("{p}.mlp.0.weight"), vec![4 * d, d]);
        add(format!("{p}.mlp.0.bias"), vec![4 * d]);
        add(format!("{p}.mlp.2.weight"), vec![d, 4 * d]);
        add(format!("{p}.mlp.2.bias"), vec![d]);
        if cfg.adaln {
            add(format!("{p}.adaLN_modulation.weight"), vec![6 * d, c]);
            add(format!("{p}.adaLN_modulation.bias"), vec![6 * d]);
        }
    }
    add("output_layer.norm_final.weight".into(), vec![d]);
    add("output_layer.linear.weight".into(), vec![v, d]);
    add("output_layer.linear.bias".into(), vec![v]);
    if cfg.adaln {
        add(
            "output_layer.adaLN_modulation.weight".into(),
            vec![2 * d, c],
        );
        add("output_layer.adaLN_modulation.bias".into(), vec![2 * d]);
    }
    specs
}

/// An opened checkpoint: its config and its memory-mapped tensors.
pub struct Checkpoint {
    /// The parsed and validated `config.json`.
    pub config: Config,
    dir: PathBuf,
    tensors: MmapedSafetensors,
    /// Which file holds each tensor, for error messages.
    files: HashMap<String, PathBuf>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`, validating the config and the presence, shape and
    /// dtype of every tensor the network needs. Unknown tensors are reported with a warning.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = read_config(&dir)?;
        let paths = weight_files(&dir)?;
        let mut files = HashMap::new();
        for path in &paths {
            // SAFETY: the mapping is read-only; a checkpoint modified while mapped is the
            // caller's fault, as with every memory-mapped model loader.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Checkpoint {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                files.insert(name, path.clone());
            }
        }
        // SAFETY: as above.
        let tensors =
            unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| Error::Checkpoint {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
        let ckpt = Self {
            config,
            dir,
            tensors,
            files,
        };
        ckpt.check_tensors()?;
        Ok(ckpt)
    }

    /// A hash of the weight files' bytes (16 hex digits): KV state computed by other
    /// weights is never used.
    pub fn fingerprint(&self) -> Result<String> {
        let files = self.files.values().map(PathBuf::as_path);
        Ok(bd3lm_config::checkpoint::fingerprint(files)?)
    }

    /// The directory the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_tensors(&self) -> Result<()> {
        let specs = tensor_specs(&self.config);
        for (name, expected) in &specs {
            let view = self
                .tensors
                .get(name)
                .map_err(|_| Error::MissingTensor { name: name.clone() })?;
            check_float(name, view.dtype())?;
            if view.shape() != expected.as_slice() {
                return Err(Error::TensorShape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: view.shape().to_vec(),
                });
            }
        }
        for name in EPS_TENSORS {
            if let Ok(view) = self.tensors.get(name) {
                check_float(name, view.dtype())?;
                if view.shape().iter().product::<usize>() != 1 {
                    return Err(Error::TensorShape {
                        name: name.into(),
                        expected: vec![],
                        found: view.shape().to_vec(),
                    });
                }
            }
        }
        let known: BTreeSet<&str> = specs
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(EPS_TENSORS)
            .chain([INV_FREQ_TENSOR])
            .collect();
        let unknown: Vec<&String> = self
            .files
            .keys()
            .filter(|n| !known.contains(n.as_str()))
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(dir = %self.dir.display(), count = unknown.len(), names = ?unknown, "ignoring unknown tensors");
        }
        Ok(())
    }

    /// The clipped noise interval `(eps_min, eps_max)`: the stored scalars when present,
    /// else the config's values.
    pub fn sampling_eps(&self) -> Result<(f64, f64)> {
        let read = |name: &str, default: f64| -> Result<f64> {
            match self.tensors.get(name) {
                Ok(_) => {
                    let t = self
                        .tensors
                        .load(name, &Device::Cpu)?
                        .to_dtype(DType::F64)?;
                    Ok(t.flatten_all()?.to_vec1::<f64>()?[0])
                }
                Err(_) => Ok(default),
            }
        };
        Ok((
            read(EPS_TENSORS[0], self.config.sampling_eps_min)?,
            read(EPS_TENSORS[1], self.config.sampling_eps_max)?,
        ))
    }

    /// The network's tensors in f32 on the CPU, by published name: the starting point of
    /// fine-tuning.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, _) in tensor_specs(&self.config) {
            let t = self
                .tensors
                .load(&name, &Device::Cpu)?
                .to_dtype(DType::F32)?;
            out.insert(name, t);
        }
        Ok(out)
    }

    /// Builds the network with weights converted to `dtype` on `device`.
    pub fn load_model(self, dtype: DType, device: &Device) -> Result<Bd3lm> {
        let cfg = self.config.clone();
        let vb = VarBuilder::from_backend(Box::new(self.tensors), dtype, device.clone());
        Bd3lm::load(vb, &cfg)
    }
}

fn check_float(name: &str, dtype: StDtype) -> Result<()> {
    match dtype {
        StDtype::F32 | StDtype::BF16 | StDtype::F16 | StDtype::F64 => Ok(()),
        other => Err(Error::TensorDtype {
            name: name.to_string(),
            found: DType::try_from(other).unwrap_or(DType::U8),
        }),
    }
}

/// Writes a checkpoint in the published layout: `config.json` and `model.safetensors`
/// holding `tensors` converted to `dtype` plus the clipped-interval scalars from `cfg`.
///
/// Each file is written to a temporary name and renamed, so a reader never sees half a
/// checkpoint file.
pub fn save(
    dir: impl AsRef<Path>,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    cfg.validate()?;
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, expected) in tensor_specs(cfg) {
        let t = tensors
            .get(&name)
            .ok_or_else(|| Error::MissingTensor { name: name.clone() })?;
        if t.dims() != expected.as_slice() {
            return Err(Error::TensorShape {
                name,
                expected,
                found: t.dims().to_vec(),
            });
        }
    }
    let mut out: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len() + 2);
    for (name, t) in tensors {
        out.insert(name.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?);
    }
    for (name, value) in EPS_TENSORS
        .iter()
        .zip([cfg.sampling_eps_min, cfg.sampling_eps_max])
    {
        out.insert(name.to_string(), Tensor::new(value as f32, &Device::Cpu)?);
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&out, &tmp).map_err(|e| Error::Checkpoint {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    rename(&tmp, &weights)?;
    let config = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    let text = serde_json::to_string_pretty(cfg).map_err(bd3lm_config::Error::ConfigJson)?;
    std::fs::write(&tmp, text).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    rename(&tmp, &config)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| Error::Io {
        path: to.to_path_buf(),
        source,
    })
}

/// Random weights for `cfg`: every tensor drawn from N(0, std²) by a ChaCha generator
/// seeded with `seed` (the same weights on every machine), in f32 on the CPU.
pub fn random_weights(cfg: &Config, std: f64, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in tensor_specs(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (std * standard_normal(&mut rng)) as f32)
            .collect();
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// The reference's initial weights for training `cfg`, drawn by a ChaCha generator seeded
/// with `seed`, in f32 on the CPU: linear layers and the embedding uniform in
/// `±1/sqrt(fan_in)` (PyTorch's default), norms one, and every adaLN modulation and the
/// output projection zero, so each block starts as the identity and the first prediction
/// is uniform.
pub fn init_weights(cfg: &Config, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in tensor_specs(cfg) {
        let n: usize = shape.iter().product();
        let zero = name.contains("adaLN_modulation") || name.contains("output_layer.linear");
        let data: Vec<f32> = if zero {
            vec![0.0; n]
        } else if name.contains("norm") {
            vec![1.0; n]
        } else {
            // A bias's bound is that of its layer's weight: 1/sqrt(fan_in).
            let fan_in = match name.strip_suffix(".bias") {
                Some(layer) => tensor_specs(cfg)
                    .into_iter()
                    .find(|(w, _)| *w == format!("{layer}.weight"))
                    .map_or(1, |(_, s)| s[1]),
                None => shape[1],
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| (bound * (2.0 * rng.random::<f64>() - 1.0)) as f32)
                .collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// A standard normal draw by the Box-Muller transform.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The network of `cfg` with [`random_weights`], in `dtype` on `device`.
pub fn random_model(
    cfg: &Config,
    std: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Bd3lm> {
    from_weights(cfg, random_weights(cfg, std, seed)?, dtype, device)
}

/// The network of `cfg` over `weights` (published names), converted to `dtype` on
/// `device`.
pub fn from_weights(
    cfg: &Config,
    weights: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Bd3lm> {
    Bd3lm::load(VarBuilder::from_tensors(weights, dtype, device), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, small_config, tokens, zeros};

    fn saved(dtype: DType) -> (tempfile::TempDir, Config, HashMap<String, Tensor>) {
        let cfg = small_config(4);
        let weights = random_weights(&cfg, 0.2, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &cfg, &weights, dtype).unwrap();
        (dir, cfg, weights)
    }

    fn logits(model: &Bd3lm) -> Tensor {
        let x = tokens(
            1,
            2 * model.config().model_length,
            model.config().vocab_size,
            1,
        );
        model.forward_train(&x, &zeros(1)).unwrap()
    }

    #[test]
    fn save_then_load_round_trips_bit_exactly() {
        let (dir, cfg, weights) = saved(DType::F32);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.config, cfg);
        assert_eq!(ckpt.sampling_eps().unwrap(), (1e-3f32 as f64, 1.0));
        let loaded = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
        let direct = Bd3lm::load(
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap();
        assert_eq!(max_diff(&logits(&loaded), &logits(&direct)), 0.0);
    }

    #[test]
    fn fingerprints_follow_the_weights() {
        let (a, _, _) = saved(DType::F32);
        let (b, _, _) = saved(DType::BF16);
        let fa = Checkpoint::open(a.path()).unwrap().fingerprint().unwrap();
        assert_eq!(
            fa,
            Checkpoint::open(a.path()).unwrap().fingerprint().unwrap()
        );
        assert_ne!(
            fa,
            Checkpoint::open(b.path()).unwrap().fingerprint().unwrap()
        );
    }

    #[test]
    fn bf16_on_disk_loads_as_f32() {
        let (dir, _, weights) = saved(DType::BF16);
        let loaded = Checkpoint::open(dir.path())
            .unwrap()
            .load_model(DType::F32, &Device::Cpu)
            .unwrap();
        let direct = Bd3lm::load(
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
            loaded.config(),
        )
        .unwrap();
        let diff = max_diff(&logits(&loaded), &logits(&direct));
        assert!(diff > 0.0 && diff < 0.1, "{diff}");
    }

    #[test]
    fn sharded_checkpoint_loads_like_a_single_file() {
        let (dir, cfg, weights) = saved(DType::F32);
        let sharded = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join(CONFIG_FILE),
            sharded.path().join(CONFIG_FILE),
        )
        .unwrap();
        let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
        let mut weight_map = serde_json::Map::new();
        for (i, (name, t)) in weights.iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
            shards[i % 2].insert(name.clone(), t.clone());
            weight_map.insert(name.clone(), file.into());
        }
        for (i, shard) in shards.iter().enumerate() {
            let path = sharded
                .path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1));
            candle_core::safetensors::save(shard, path).unwrap();
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(sharded.path().join(INDEX_FILE), index.to_string()).unwrap();
        let a = Checkpoint::open(sharded.path())
            .unwrap()
            .load_model(DType::F32, &Device::Cpu)
            .unwrap();
        let b = Checkpoint::open(dir.path())
            .unwrap()
            .load_model(DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(a.config(), &cfg);
        assert_eq!(max_diff(&logits(&a), &logits(&b)), 0.0);
    }

    fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let path = dir.join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        edit(&mut tensors);
        candle_core::safetensors::save(&tensors, &path).unwrap();
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let (dir, _, _) = saved(DType::F32);
        rewrite(dir.path(), |t| {
            t.remove("backbone.blocks.1.mlp.0.bias");
        });
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("backbone.blocks.1.mlp.0.bias") && err.contains("missing"),
            "{err}"
        );

        let (dir, _, _) = saved(DType::F32);
        rewrite(dir.path(), |t| {
            t.insert(
                "backbone.blocks.0.attn_out.weight".into(),
                Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
            );
        });
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("backbone.blocks.0.attn_out.weight")
                && err.contains("[32, 32]")
                && err.contains("[32, 31]"),
            "{err}"
        );
    }

    #[test]
    fn unknown_tensors_are_ignored() {
        let (dir, _, _) = saved(DType::F32);
        rewrite(dir.path(), |t| {
            t.insert(
                "backbone.extra_head.weight".into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        assert!(
            Checkpoint::open(dir.path())
                .unwrap()
                .load_model(DType::F32, &Device::Cpu)
                .is_ok()
        );
    }

    #[test]
    fn unworkable_configs_and_missing_files_are_errors() {
        let (dir, _, _) = saved(DType::F32);
        let path = dir.path().join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"n_heads\": 4", "\"n_heads\": 5");
        std::fs::write(&path, text).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("hidden_dim") && err.contains("n_heads"),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(
            Checkpoint::open(empty.path())
                .err()
                .unwrap()
                .to_string()
                .contains("config.json")
        );
        std::fs::copy(&path, empty.path().join(CONFIG_FILE)).unwrap();
        std::fs::write(empty.path().join(WEIGHTS_FILE), b"not safetensors").unwrap();
        assert!(Checkpoint::open(empty.path()).is_err());
    }
}
