//! Planning a generation: a valid request becomes a session record in the store (a new
//! one, or a continued one with its parameters merged and its prompt appended) and the
//! stop rules of this request.

use std::sync::Arc;

use bd3lm_kvstore::{CommitOutcome, SessionRecord, SessionStore};
use bd3lm_proto::v1::InfoResponse;
use bd3lm_sampling::SamplingParams;
use bd3lm_text::{StopRules, Text};

use crate::admission::{Queueing, Ticket};
use crate::error::Error;
use crate::lease::Lease;
use crate::settings::{CoordinatorSettings, Persistence};
use crate::validation::{Limits, Target, ValidRequest, Vocabulary};

/// The model served by the workers, learned from their Info, and its text handling.
pub struct ModelInfo {
    /// What the workers report.
    pub info: InfoResponse,
    /// Tokenizer and special ids.
    pub text: Text,
}

impl ModelInfo {
    /// What validation needs to know of the model.
    pub fn vocabulary(&self) -> Vocabulary<'_> {
        Vocabulary {
            size: self.info.vocab_size,
            mask_id: self.info.mask_id,
            text: &self.text,
        }
    }

    fn block_size(&self) -> usize {
        self.info.block_size as usize
    }
}

/// A request's session, stored and ready to be driven.
pub struct Plan {
    /// The session as stored.
    pub record: SessionRecord,
    /// When this request stops.
    pub rules: StopRules,
    /// Index in the session's tokens where this request's output starts.
    pub start: usize,
    /// The model.
    pub model: Arc<ModelInfo>,
    /// This generation's hold on the session.
    pub lease: Lease,
    /// When this generation writes the session's KV state to the store.
    pub persistence: Persistence,
    /// Its place among the admitted generations, held while it runs.
    pub ticket: Ticket,
    /// Where its blocks wait for worker slots.
    pub queueing: Queueing,
    /// When the call must be answered (its gRPC deadline): the generation ends then.
    pub deadline: Option<std::time::Instant>,
}

/// Read-modify-write attempts of one record update before it is ABORTED.
const WRITE_TRIES: usize = 8;

/// Creates or continues the session of `valid` in `store`, under the session's lease,
/// within the limits and by the defaults of `settings`. Everything is checked before the
/// store is written: a refused request leaves no session behind and changes none (its
/// lease is given up as it is dropped).
pub async fn plan(
    valid: ValidRequest,
    model: Arc<ModelInfo>,
    store: &SessionStore,
    settings: &CoordinatorSettings,
    owner: Option<String>,
    (ticket, queueing): (Ticket, Queueing),
) -> Result<Plan, Error> {
    let limits = &settings.limits;
    let model_id = model.info.model_id.clone();
    let id = match &valid.target {
        Target::New { .. } => format!("{:032x}", rand::random::<u128>()),
        Target::Continue { session_id, .. } => {
            // Another key's session is refused before its lease is touched.
            if owner.is_some() {
                load(store, &model_id, session_id, owner.as_deref()).await?;
            }
            session_id.clone()
        }
    };
    // A new session is checked whole before it takes a lease or counts against its
    // key: a refused one leaves nothing behind.
    let step = match &valid.target {
        Target::New { prompt, seed } => Step::New(NewSession {
            prompt,
            seed: *seed,
            sampling: valid.new_session(prompt.len(), model.block_size(), limits)?,
        }),
        Target::Continue { appended, .. } => Step::Continue(appended),
    };
    let lease = Lease::take(store, &model_id, &id, settings.lease_terms()).await?;
    if let Some(key) = &owner {
        claim_slot(store, &model_id, key, &id, limits).await?;
    }
    let record = match step {
        Step::New(new) => {
            let created = create(&model, store, &id, new, owner.clone()).await;
            if let (Err(_), Some(key)) = (&created, &owner) {
                release_slot(store, &model_id, key, &id).await;
            }
            created?
        }
        Step::Continue(appended) => {
            update(store, &model_id, &id, owner.as_deref(), |record| {
                if !appended.is_empty() {
                    // Appended after everything committed: tokens held back from the last
                    // response are dropped from view.
                    record.tokens.extend_from_slice(appended);
                    record.returned = record.tokens.len();
                }
                record.sampling = valid.continuation(record, limits)?;
                Ok(())
            })
            .await?
        }
    };
    let rules = StopRules::new(
        valid.max_new_tokens,
        valid.stop_on_eos.then_some(model.text.eos),
        valid.stop_token_ids,
        model.text.stop_hook(valid.stop),
    );
    Ok(Plan {
        start: record.returned,
        record,
        rules,
        model,
        lease,
        persistence: valid.kv_persistence.unwrap_or(settings.kv_persistence),
        ticket,
        queueing,
        deadline: None,
    })
}

/// Counts session `id` among the live sessions of the API key `key` (a continuation
/// renews its count); RESOURCE_EXHAUSTED when the key holds its limit of others.
async fn claim_slot(
    store: &SessionStore,
    model_id: &str,
    key: &str,
    id: &str,
    limits: &Limits,
) -> Result<(), Error> {
    let limit = limits.max_sessions_per_key;
    if store.claim_slot(model_id, key, id, limit).await? {
        return Ok(());
    }
    tracing::info!(limit, "an API key's live sessions are at their limit");
    bd3lm_telemetry::metrics::refused("sessions_per_key");
    Err(Error::Refused(format!(
        "session_id: this API key holds {limit} live sessions, its limit; delete one or wait for one to expire"
    )))
}

/// Stops counting `id` against `key` after its creation failed (a failure to do so is
/// logged: the count then lapses with the store's TTL).
async fn release_slot(store: &SessionStore, model_id: &str, key: &str, id: &str) {
    if let Err(e) = store.release_slot(model_id, key, id).await {
        tracing::warn!(error = %e, "releasing a refused session's count failed");
    }
}

/// What a request does to its session.
enum Step<'a> {
    /// Creates it.
    New(NewSession<'a>),
    /// Continues it, these tokens appended.
    Continue(&'a [u32]),
}

/// What a new session starts from, checked.
struct NewSession<'a> {
    prompt: &'a [u32],
    seed: u64,
    sampling: SamplingParams,
}

/// Stores `new` session `id`, owned by `owner`.
async fn create(
    model: &ModelInfo,
    store: &SessionStore,
    id: &str,
    new: NewSession<'_>,
    owner: Option<String>,
) -> Result<SessionRecord, Error> {
    let NewSession {
        prompt,
        seed,
        sampling,
    } = new;
    let mut record = SessionRecord {
        id: id.to_string(),
        model_id: model.info.model_id.clone(),
        prompt_len: prompt.len(),
        returned: prompt.len(),
        tokens: prompt.to_vec(),
        committed_blocks: 0,
        seed,
        sampling,
        version: 0,
        owner,
        model_version: None,
    };
    record.version = store.create_session(&record).await?;
    Ok(record)
}

/// Applies `change` to session `id` as stored (of `owner`, when given), by
/// compare-and-set: a write that lost to another (a block of an ended generation landing
/// meanwhile) is redone on the record as it is then. Returns the record as written.
pub async fn update(
    store: &SessionStore,
    model_id: &str,
    id: &str,
    owner: Option<&str>,
    mut change: impl FnMut(&mut SessionRecord) -> Result<(), Error>,
) -> Result<SessionRecord, Error> {
    for _ in 0..WRITE_TRIES {
        let mut record = load(store, model_id, id, owner).await?;
        let base = record.base();
        change(&mut record)?;
        match store.update_session(&record, base).await? {
            CommitOutcome::Committed(version) => {
                record.version = version;
                return Ok(record);
            }
            CommitOutcome::Superseded(_) => {
                tracing::info!("the session changed while it was updated; again");
            }
        }
    }
    Err(Error::Contended)
}

/// Reads session `id` of `model_id`; [`Error::NoSession`] when there is none, or when
/// `owner` is given and the session belongs to another API key (whose sessions are not
/// even said to exist).
pub async fn load(
    store: &SessionStore,
    model_id: &str,
    id: &str,
    owner: Option<&str>,
) -> Result<SessionRecord, Error> {
    let missing = || Error::NoSession(id.to_string());
    let record = store.get_session(model_id, id).await?.ok_or_else(missing)?;
    match owner {
        Some(key) if record.owner.as_deref() != Some(key) => Err(missing()),
        _ => Ok(record),
    }
}
