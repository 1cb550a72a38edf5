//! Planning a generation: a valid request becomes a session record in the store (a new
//! one, or a continued one with its parameters merged and its prompt appended) and the
//! stop rules of this request.

use std::sync::Arc;

use bd3lm_kvstore::{CommitOutcome, SessionRecord, Store};
use bd3lm_proto::v1::InfoResponse;
use bd3lm_text::{StopRules, Text};
use tonic::Status;

use crate::lease::{Lease, LeaseTerms};
use crate::validation::{self, Limits, Target, ValidRequest, Vocabulary};

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
}

/// Read-modify-write attempts of one record update before it is ABORTED.
const WRITE_TRIES: usize = 8;

/// Creates or continues the session of `valid` in `store`, under the session's lease.
/// Everything is checked before the store is written: a refused request leaves no
/// session behind and changes none.
pub async fn plan(
    valid: ValidRequest,
    model: Arc<ModelInfo>,
    store: &Store,
    limits: &Limits,
    terms: LeaseTerms,
) -> Result<Plan, Status> {
    let model_id = model.info.model_id.clone();
    let id = match &valid.target {
        Target::New { .. } => format!("{:032x}", rand::random::<u128>()),
        Target::Continue { session_id, .. } => {
            validation::check_session_id(session_id)?;
            session_id.clone()
        }
    };
    let lease = Lease::take(store, &model_id, &id, terms).await?;
    let stored = match &valid.target {
        Target::New { prompt, seed } => {
            create(&valid, &model, store, limits, (id, prompt, *seed)).await
        }
        Target::Continue { appended, .. } => {
            update(store, &model_id, &id, |record| {
                record.sampling = validation::sampling(
                    &valid.sampling,
                    Some(&record.sampling),
                    model.block_size(),
                    limits,
                )?;
                if !appended.is_empty() {
                    // Appended after everything committed: tokens held back from the last
                    // response are dropped from view.
                    record.tokens.extend_from_slice(appended);
                    record.returned = record.tokens.len();
                }
                Ok(validation::session_length(
                    record.returned,
                    valid.max_new_tokens,
                    limits,
                )?)
            })
            .await
        }
    };
    let record = match stored {
        Ok(record) => record,
        Err(status) => {
            lease.release().await;
            return Err(status);
        }
    };
    let rules = StopRules {
        max_new_tokens: valid.max_new_tokens,
        eos: valid.stop_on_eos.then_some(model.text.eos),
        stop_sequences: valid.stop_token_ids,
        hook: model.text.stop_hook(valid.stop),
    };
    Ok(Plan {
        start: record.returned,
        record,
        rules,
        model,
        lease,
    })
}

/// Stores the new session `id` of `prompt` and `seed`.
async fn create(
    valid: &ValidRequest,
    model: &ModelInfo,
    store: &Store,
    limits: &Limits,
    (id, prompt, seed): (String, &Vec<u32>, u64),
) -> Result<SessionRecord, Status> {
    let sampling = validation::sampling(&valid.sampling, None, model.block_size(), limits)?;
    validation::session_length(prompt.len(), valid.max_new_tokens, limits)?;
    let mut record = SessionRecord {
        id,
        model_id: model.info.model_id.clone(),
        prompt_len: prompt.len(),
        returned: prompt.len(),
        tokens: prompt.clone(),
        committed_blocks: 0,
        seed,
        sampling,
        version: 0,
    };
    record.version = store.create_session(&record).await?;
    Ok(record)
}

/// Applies `change` to session `id` as stored, by compare-and-set: a write that lost
/// to another (a block of an ended generation landing meanwhile) is redone on the
/// record as it is then. Returns the record as written.
pub async fn update(
    store: &Store,
    model_id: &str,
    id: &str,
    mut change: impl FnMut(&mut SessionRecord) -> Result<(), Status>,
) -> Result<SessionRecord, Status> {
    for _ in 0..WRITE_TRIES {
        let mut record = load(store, model_id, id).await?;
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
    Err(Status::aborted(
        "session_id: the session kept changing; retry",
    ))
}

/// Reads session `id` of `model_id`; NOT_FOUND naming it when there is none.
pub async fn load(store: &Store, model_id: &str, id: &str) -> Result<SessionRecord, Status> {
    validation::check_session_id(id)?;
    store
        .get_session(model_id, id)
        .await?
        .ok_or_else(|| bd3lm_kvstore::Error::NoSession(id.to_string()).into())
}
