//! The model registry: each published version is a checkpoint directory
//! `{dir}/{name}/{version}` in the registry's storage (a volume the trainers write and the
//! denoise workers read) and a record in the store. A version's files are complete before
//! its record exists, and neither is ever written again.
//!
//! A version leaves the registry when it is retired, by its name's owner or by the
//! keep-the-newest policy of the publishing trainer (which passes over pinned versions):
//! its record goes first, atomically, so no new reader finds it; its files go after, when
//! a trainer (the registry storage's writer) next sweeps the retired versions.

use std::path::{Path, PathBuf};

use bd3lm_config::Config;
use bd3lm_config::checkpoint::{fingerprint, read_config, weight_files};
use bd3lm_kvstore::{JobStore, Retirement};
use bd3lm_proto::v1 as wire;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A published version's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// The model's name.
    pub name: String,
    /// The version, from 1.
    pub version: u64,
    /// The checkpoint's fingerprint (weights and configuration).
    pub fingerprint: String,
    /// The job that made it.
    pub job_id: String,
    /// Steps trained.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// The latest validation's NELBO and perplexity bound, if one ran.
    #[serde(with = "crate::figure::pair")]
    pub validation: Option<(f64, f64)>,
    /// The checkpoint's configuration (clipped interval included).
    pub config: Config,
    /// Publication time, ms since the Unix epoch.
    pub published_ms: u64,
}

impl ModelVersion {
    /// The version as the API shows it, `pinned` or not.
    pub fn to_wire(&self, pinned: bool) -> wire::ModelVersion {
        let (nelbo, perplexity_bound) = self.validation.unwrap_or_default();
        wire::ModelVersion {
            name: self.name.clone(),
            version: self.version,
            fingerprint: self.fingerprint.clone(),
            job_id: self.job_id.clone(),
            step: self.step,
            tokens: self.tokens,
            nelbo,
            perplexity_bound,
            block_size: self.config.block_size as u32,
            published_unix_ms: self.published_ms,
            pinned,
        }
    }
}

/// What a publication records besides the checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Steps trained.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// The latest validation's NELBO and perplexity bound.
    pub validation: Option<(f64, f64)>,
}

/// The registry over a store and (for publishing and loading) its storage directory.
#[derive(Clone)]
pub struct Registry {
    store: JobStore,
    /// The storage directory; `None` for a reader of the records only (the coordinator).
    dir: Option<PathBuf>,
}

/// Checks a model name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot (a name is a
/// directory of the registry and part of store keys).
pub fn check_name(field: &'static str, name: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(allowed) {
        return Err(Error::invalid(
            field,
            "a model name is 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)",
        ));
    }
    if bd3lm_kvstore::jobs::RESERVED_MODEL_NAMES.contains(&name) {
        return Err(Error::invalid(
            field,
            "this name is reserved by the registry",
        ));
    }
    Ok(())
}

impl Registry {
    /// The registry whose records are in `store` and files under `dir`.
    pub fn new(store: JobStore, dir: impl Into<PathBuf>) -> Self {
        Self {
            store,
            dir: Some(dir.into()),
        }
    }

    /// The registry's records in `store`, without its files: lists and checks versions,
    /// neither publishes nor loads them.
    pub fn records(store: JobStore) -> Self {
        Self { store, dir: None }
    }

    /// The checkpoint directory of a version.
    pub fn path(&self, name: &str, version: u64) -> Result<PathBuf> {
        let dir = self.dir.as_ref().ok_or_else(|| {
            Error::Corrupt("this registry was opened without its storage directory".into())
        })?;
        Ok(dir.join(name).join(version.to_string()))
    }

    /// Publishes the checkpoint in `checkpoint` as the next version of `name`: its files
    /// are copied into a fresh directory and renamed into place, then recorded.
    #[tracing::instrument(skip(self, checkpoint, figures))]
    pub async fn publish(
        &self,
        checkpoint: &Path,
        name: &str,
        job_id: &str,
        figures: Figures,
    ) -> Result<ModelVersion> {
        check_name("publish_as", name)?;
        let version = self.store.next_model_version(name).await?;
        let target = self.path(name, version)?;
        let (from, to) = (checkpoint.to_path_buf(), target.clone());
        let (fingerprint, config) =
            tokio::task::spawn_blocking(move || copy_checkpoint(&from, &to))
                .await
                .map_err(|e| Error::Corrupt(format!("publishing stopped: {e}")))??;
        let record = ModelVersion {
            name: name.to_string(),
            version,
            fingerprint,
            job_id: job_id.to_string(),
            step: figures.step,
            tokens: figures.tokens,
            validation: figures.validation,
            config,
            published_ms: crate::job::now_ms(),
        };
        let body = serde_json::to_vec(&record).expect("a version serializes");
        if !self
            .store
            .record_model_version(name, version, &body)
            .await?
        {
            return Err(Error::Corrupt(format!(
                "{name} version {version} was recorded twice"
            )));
        }
        tracing::info!(name, version, fingerprint = %record.fingerprint, "model version published");
        Ok(record)
    }

    /// The versions of `name`, oldest first (none for an unknown name); a record that
    /// does not decode is skipped and counted, never the listing failed for it.
    pub async fn versions(&self, name: &str) -> Result<Vec<ModelVersion>> {
        let stored = self.store.model_versions(name).await?;
        let mut versions = Vec::with_capacity(stored.len());
        for (_, body) in stored {
            match serde_json::from_slice(&body) {
                Ok(version) => versions.push(version),
                Err(e) => crate::undecodable("model_version", &Error::Corrupt(e.to_string())),
            }
        }
        Ok(versions)
    }

    /// The latest version of `name`.
    pub async fn latest(&self, name: &str) -> Result<Option<ModelVersion>> {
        Ok(self.versions(name).await?.pop())
    }

    /// Checks that the API key `owner` may publish under `name`, claiming the name for
    /// it when it has no owner: a name belongs to the key that first claimed it, and an
    /// administrator's key may publish under any. PERMISSION_DENIED naming `publish_as`
    /// otherwise; a name published before names had owners is an administrator's only.
    pub async fn claim(&self, name: &str, owner: &str, admin: bool) -> Result<()> {
        let holder = self.store.claim_model_name(name, owner).await?;
        if admin || holder.as_deref() == Some(owner) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "publish_as: the model name {name} belongs to another API key"
        )))
    }

    /// The names with a published version, sorted.
    pub async fn names(&self) -> Result<Vec<String>> {
        Ok(self.store.model_names().await?)
    }

    /// A model as the API shows it; NOT_FOUND naming it when it has no version.
    pub async fn model(&self, name: &str) -> Result<wire::Model> {
        check_name("name", name)?;
        let versions = self.versions(name).await?;
        if versions.is_empty() {
            return Err(Error::NotFound(format!(
                "name: no model {name} in the registry"
            )));
        }
        let pins = self.store.model_pins(name).await?;
        let versions = versions
            .iter()
            .map(|v| v.to_wire(pins.contains(&v.version)));
        Ok(wire::Model {
            name: name.to_string(),
            versions: versions.collect(),
        })
    }

    /// Checks that the API key `key` (with administrator rights or not) may retire or pin
    /// versions of `name`: its owner or an administrator may; on an open API (no key)
    /// anyone. NOT_FOUND naming `name` for an unknown model, PERMISSION_DENIED for
    /// another key's.
    async fn check_owner(&self, name: &str, key: Option<&str>, admin: bool) -> Result<()> {
        check_name("name", name)?;
        let Some(key) = key else { return Ok(()) };
        if admin || self.store.model_owner(name).await?.as_deref() == Some(key) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "name: the model {name} belongs to another API key"
        )))
    }

    /// Retires version `version` of `name` for `key` (see [`Registry::check_owner`]):
    /// the version as it was. FAILED_PRECONDITION for a pinned one.
    pub async fn retire(
        &self,
        name: &str,
        version: u64,
        (key, admin): (Option<&str>, bool),
    ) -> Result<wire::ModelVersion> {
        self.check_owner(name, key, admin).await?;
        match self.store.retire_model_version(name, version).await? {
            Retirement::Retired(body) => {
                metrics::counter!(RETIRED, "by" => "api").increment(1);
                tracing::info!(name, version, "model version retired");
                Ok(retired_wire(name, version, &body))
            }
            Retirement::Pinned => Err(Error::Precondition(format!(
                "version: {name} version {version} is pinned; unpin it first"
            ))),
            Retirement::NotFound => Err(no_version(name, version)),
        }
    }

    /// Pins (or unpins) version `version` of `name` for `key` (see
    /// [`Registry::check_owner`]): the version as it is now.
    pub async fn pin(
        &self,
        name: &str,
        version: u64,
        pinned: bool,
        (key, admin): (Option<&str>, bool),
    ) -> Result<wire::ModelVersion> {
        self.check_owner(name, key, admin).await?;
        if !self.store.pin_model_version(name, version, pinned).await? {
            return Err(no_version(name, version));
        }
        let versions = self.versions(name).await?;
        let found = versions.into_iter().find(|v| v.version == version);
        // Retired between the pin and this read: the pin went with it.
        let found = found.ok_or_else(|| no_version(name, version))?;
        Ok(found.to_wire(pinned))
    }

    /// Retires the versions of `name` older than its newest `keep`, the pinned ones
    /// excepted: the versions retired.
    pub async fn keep_newest(&self, name: &str, keep: usize) -> Result<Vec<u64>> {
        let stored = self.store.model_versions(name).await?;
        let pins = self.store.model_pins(name).await?;
        let older = stored.len().saturating_sub(keep);
        let mut retired = Vec::new();
        for (version, _) in stored.into_iter().take(older) {
            if pins.contains(&version) {
                continue;
            }
            // Pinned meanwhile, or retired by another: passed over.
            if let Retirement::Retired(_) = self.store.retire_model_version(name, version).await? {
                metrics::counter!(RETIRED, "by" => "policy").increment(1);
                retired.push(version);
            }
        }
        if !retired.is_empty() {
            tracing::info!(name, keep, ?retired, "older model versions retired");
        }
        Ok(retired)
    }

    /// Removes the files of every retired version from the registry's storage: how many
    /// went. A version is forgotten only once its directory is gone, so a failed removal
    /// is tried again at the next sweep.
    pub async fn remove_retired(&self) -> Result<usize> {
        let mut removed = 0;
        for (name, version) in self.store.retired_model_versions().await? {
            // A stored name is checked before it becomes a path.
            if check_name("name", &name).is_err() {
                continue;
            }
            let dir = self.path(&name, version)?;
            let gone = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir)(e)),
                _ => Ok(()),
            });
            gone.await
                .map_err(|e| Error::Corrupt(format!("removal stopped: {e}")))??;
            self.store
                .forget_retired_model_version(&name, version)
                .await?;
            metrics::counter!(FILES_REMOVED).increment(1);
            removed += 1;
        }
        Ok(removed)
    }
}

/// Model versions retired, by who retired them (`api`, `policy`).
pub(crate) const RETIRED: &str = "bd3lm_registry_versions_retired_total";
/// Retired versions whose files were removed.
pub(crate) const FILES_REMOVED: &str = "bd3lm_registry_files_removed_total";

/// NOT_FOUND naming `version`.
fn no_version(name: &str, version: u64) -> Error {
    Error::NotFound(format!("version: {name} has no version {version}"))
}

/// A retired version as the API shows it, only its name and number when its record does
/// not decode (it is retired all the same).
fn retired_wire(name: &str, version: u64, body: &[u8]) -> wire::ModelVersion {
    match serde_json::from_slice::<ModelVersion>(body) {
        Ok(record) => record.to_wire(false),
        Err(e) => {
            crate::undecodable("model_version", &Error::Corrupt(e.to_string()));
            wire::ModelVersion {
                name: name.to_string(),
                version,
                ..Default::default()
            }
        }
    }
}

/// Copies a checkpoint directory's files into `to` (which must not exist) through a
/// temporary sibling, and reads its fingerprint and configuration from the copy.
fn copy_checkpoint(from: &Path, to: &Path) -> Result<(String, Config)> {
    let parent = to.parent().expect("a version directory has a parent");
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    let name = to.file_name().expect("a version directory has a name");
    let tmp = parent.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    for entry in std::fs::read_dir(from).map_err(Error::io(from))? {
        let entry = entry.map_err(Error::io(from))?;
        if entry
            .file_type()
            .map_err(Error::io(entry.path()))?
            .is_file()
        {
            let dest = tmp.join(entry.file_name());
            std::fs::copy(entry.path(), &dest).map_err(Error::io(&dest))?;
        }
    }
    // The copy is what is fingerprinted: the version's record describes the files served.
    let corrupt = |e: bd3lm_config::Error| Error::Corrupt(e.to_string());
    let config = read_config(&tmp).map_err(corrupt)?;
    let files = weight_files(&tmp).map_err(corrupt)?;
    let fingerprint = fingerprint(files.iter().map(PathBuf::as_path)).map_err(corrupt)?;
    if to.exists() {
        return Err(Error::Corrupt(format!("{} exists already", to.display())));
    }
    std::fs::rename(&tmp, to).map_err(Error::io(to))?;
    Ok((fingerprint, config))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bd3lm_kvstore::StoreConfig;
    use bd3lm_model::checkpoint::Checkpoint;
    use bd3lm_training::test_util::word_config;
    use candle_core::DType;

    /// The tiny network of the training tests' word corpus (vocabulary 12, rows of 16).
    pub(crate) fn tiny(block_size: usize) -> Config {
        word_config(16, block_size)
    }

    /// A checkpoint of `config` with seeded random weights in `dir`.
    pub(crate) fn checkpoint(dir: &Path, config: &Config, seed: u64) -> PathBuf {
        let weights = bd3lm_model::checkpoint::init_weights(config, seed).unwrap();
        bd3lm_model::checkpoint::save(dir, config, &weights, DType::F32).unwrap();
        dir.to_path_buf()
    }

    /// A version whose validation diverged (an infinite perplexity bound) is listed with
    /// it; a version record that does not decode is skipped, the others still listed;
    /// version records mutated at random decode or fail to, never panic.
    #[tokio::test]
    async fn diverged_and_undecodable_versions_leave_listings_working() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::memory(StoreConfig::default());
        let registry = Registry::new(store.clone(), dir.path().join("registry"));
        let diverged = Figures {
            step: 3,
            tokens: 300,
            validation: Some((f64::INFINITY, f64::INFINITY)),
        };
        let a = checkpoint(&dir.path().join("a"), &tiny(4), 1);
        let published = registry
            .publish(&a, "tiny", "job-a", diverged)
            .await
            .unwrap();
        assert!(
            store
                .record_model_version("tiny", 2, b"\x00garbage")
                .await
                .unwrap()
        );
        let versions = registry.versions("tiny").await.unwrap();
        assert_eq!(versions, vec![published.clone()]);
        let shown = registry.model("tiny").await.unwrap();
        assert!(shown.versions[0].perplexity_bound.is_infinite());

        let seeds = [serde_json::to_vec(&published).unwrap()];
        let budget = std::time::Duration::from_secs(1);
        bd3lm_bytes::fuzz::fuzz("model version record", &seeds, budget, |body| {
            let _ = serde_json::from_slice::<ModelVersion>(body);
        });
    }

    /// A model name belongs to the first key that claims it; another key is refused
    /// (PERMISSION_DENIED naming `publish_as`), an administrator's is not and takes
    /// nothing over; a name published before names had owners is an administrator's.
    #[tokio::test]
    async fn a_name_belongs_to_its_first_key() {
        let store = JobStore::memory(StoreConfig::default());
        let registry = Registry::records(store.clone());
        registry.claim("ours", "key-a", false).await.unwrap();
        registry.claim("ours", "key-a", false).await.unwrap();
        let refused = registry.claim("ours", "key-b", false).await.unwrap_err();
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().starts_with("publish_as:"), "{status}");
        registry.claim("ours", "admin", true).await.unwrap();
        assert!(
            registry.claim("ours", "key-b", false).await.is_err(),
            "still a's"
        );
        store
            .record_model_version("legacy", 1, b"{}")
            .await
            .unwrap();
        assert!(registry.claim("legacy", "key-a", false).await.is_err());
        registry.claim("legacy", "admin", true).await.unwrap();
    }

    /// Retiring and pinning take the name's key (or an administrator's, or any caller on
    /// an open API); a pinned version is not retired; a retired one leaves the listing.
    #[tokio::test]
    async fn versions_are_retired_and_pinned_by_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::memory(StoreConfig::default());
        let registry = Registry::new(store.clone(), dir.path().join("registry"));
        let a = checkpoint(&dir.path().join("a"), &tiny(4), 1);
        registry.claim("ours", "key-a", false).await.unwrap();
        for _ in 0..3 {
            let figures = Figures::default();
            registry.publish(&a, "ours", "j", figures).await.unwrap();
        }
        let code = |e: Error| tonic::Status::from(e).code();
        let other = (Some("key-b"), false);
        let refused = registry.retire("ours", 1, other).await.unwrap_err();
        assert_eq!(code(refused), tonic::Code::PermissionDenied);
        let refused = registry.pin("ours", 1, true, other).await.unwrap_err();
        assert_eq!(code(refused), tonic::Code::PermissionDenied);

        let owner = (Some("key-a"), false);
        let pinned = registry.pin("ours", 1, true, owner).await.unwrap();
        assert!(pinned.pinned);
        let refused = registry.retire("ours", 1, owner).await.unwrap_err();
        assert_eq!(code(refused), tonic::Code::FailedPrecondition);
        let retired = registry
            .retire("ours", 2, (Some("admin"), true))
            .await
            .unwrap();
        assert_eq!(retired.version, 2);
        let missing = registry.retire("ours", 2, owner).await.unwrap_err();
        assert_eq!(code(missing), tonic::Code::NotFound);
        registry.retire("ours", 3, (None, false)).await.unwrap();
        let shown = registry.model("ours").await.unwrap();
        let listed: Vec<_> = shown
            .versions
            .iter()
            .map(|v| (v.version, v.pinned))
            .collect();
        assert_eq!(listed, vec![(1, true)]);
        assert_eq!(registry.remove_retired().await.unwrap(), 2);
        assert!(!registry.path("ours", 2).unwrap().exists());
        assert!(registry.path("ours", 1).unwrap().is_dir());
    }

    /// Versions count up from 1, each a complete copy with its fingerprint; a registry
    /// without storage reads the records but publishes nothing.
    #[tokio::test]
    async fn versions_count_up_and_keep_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::memory(StoreConfig::default());
        let registry = Registry::new(store.clone(), dir.path().join("registry"));
        let figures = Figures {
            step: 7,
            tokens: 700,
            validation: Some((1.5, 4.48)),
        };
        let a = checkpoint(&dir.path().join("a"), &tiny(4), 1);
        let b = checkpoint(&dir.path().join("b"), &tiny(4), 2);
        let v1 = registry
            .publish(&a, "tiny", "job-a", figures)
            .await
            .unwrap();
        let v2 = registry
            .publish(&b, "tiny", "job-b", figures)
            .await
            .unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        assert_ne!(v1.fingerprint, v2.fingerprint);
        let stored = Checkpoint::open(registry.path("tiny", 2).unwrap()).unwrap();
        assert_eq!(stored.fingerprint().unwrap(), v2.fingerprint);
        assert_eq!(
            registry.versions("tiny").await.unwrap(),
            vec![v1, v2.clone()]
        );
        assert_eq!(registry.latest("tiny").await.unwrap(), Some(v2));
        assert_eq!(registry.names().await.unwrap(), vec!["tiny".to_string()]);

        let reader = Registry::records(store);
        let model = reader.model("tiny").await.unwrap();
        assert_eq!(model.versions.len(), 2);
        assert_eq!(model.versions[0].perplexity_bound, 4.48);
        let missing = reader.model("other").await.unwrap_err();
        assert!(matches!(missing, Error::NotFound(_)), "{missing}");
        assert!(reader.publish(&a, "tiny", "job-c", figures).await.is_err());
        assert!(matches!(
            registry.publish(&a, "../escape", "j", figures).await,
            Err(Error::Invalid {
                field: "publish_as",
                ..
            })
        ));
    }
}
