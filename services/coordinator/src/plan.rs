//! Planning a generation: a valid request becomes a session record in the store (a new
//! one, or a continued one with its parameters merged and its prompt appended) and the
//! stop rules of this request.

use std::sync::Arc;

use bd3lm_kvstore::{SessionRecord, Store};
use bd3lm_proto::v1::InfoResponse;
use bd3lm_text::{StopRules, Text};
use tonic::Status;

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
}

/// Creates or continues the session of `valid` in `store`. Everything is checked before
/// the store is written: a refused request leaves no session behind and changes none.
pub async fn plan(
    valid: ValidRequest,
    model: Arc<ModelInfo>,
    store: &Store,
    limits: &Limits,
) -> Result<Plan, Status> {
    let record = match &valid.target {
        Target::New { prompt, seed } => {
            let sampling = validation::sampling(&valid.sampling, None, model.block_size(), limits)?;
            SessionRecord {
                id: format!("{:032x}", rand::random::<u128>()),
                model_id: model.info.model_id.clone(),
                prompt_len: prompt.len(),
                returned: prompt.len(),
                tokens: prompt.clone(),
                committed_blocks: 0,
                seed: *seed,
                sampling,
            }
        }
        Target::Continue {
            session_id,
            appended,
        } => {
            let mut record = load(store, &model.info.model_id, session_id).await?;
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
            record
        }
    };
    validation::session_length(record.returned, valid.max_new_tokens, limits)?;
    match valid.target {
        Target::New { .. } => store.create_session(&record).await?,
        Target::Continue { .. } => store.put_session(&record).await?,
    }
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
    })
}

/// Reads session `id` of `model_id`; NOT_FOUND naming it when there is none.
pub async fn load(store: &Store, model_id: &str, id: &str) -> Result<SessionRecord, Status> {
    validation::check_session_id(id)?;
    store
        .get_session(model_id, id)
        .await?
        .ok_or_else(|| bd3lm_kvstore::Error::NoSession(id.to_string()).into())
}
