//! Request validation as one stage in two typed phases, each ending in a value or one
//! [`ValidationError`] naming the field, the limit and the value found. Every limit of
//! the public API is checked here and nowhere else.
//!
//! 1. [`validate`]: a `GenerateRequest` against the limits and the model's vocabulary
//!    becomes a [`ValidRequest`], before any session is read;
//! 2. [`ValidRequest::new_session`] and [`ValidRequest::continuation`]: that request
//!    against the session it starts or continues, giving the session's sampling
//!    parameters and checking the length it would reach.

use bd3lm_kvstore::SessionRecord;
use bd3lm_proto::v1::GenerateRequest;
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_sampling::{ParamError, SamplingOverrides, SamplingParams};
use bd3lm_text::Text;

use crate::settings::Persistence;

/// Limits on what one request may ask for.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Most prompt tokens.
    #[arg(long, env = "BD3LM_MAX_PROMPT_TOKENS", default_value_t = Limits::DEFAULT.max_prompt_tokens)]
    pub max_prompt_tokens: usize,
    /// Most new tokens per request.
    #[arg(long, env = "BD3LM_MAX_NEW_TOKENS", default_value_t = Limits::DEFAULT.max_new_tokens)]
    pub max_new_tokens: usize,
    /// Most tokens in a session (prompts and generated).
    #[arg(long, env = "BD3LM_MAX_TOTAL_TOKENS", default_value_t = Limits::DEFAULT.max_total_tokens)]
    pub max_total_tokens: usize,
    /// Most stop sequences per request (text and token ones together).
    #[arg(long, env = "BD3LM_MAX_STOP_SEQUENCES", default_value_t = Limits::DEFAULT.max_stop_sequences)]
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in bytes or tokens.
    #[arg(long, env = "BD3LM_MAX_STOP_LENGTH", default_value_t = Limits::DEFAULT.max_stop_length)]
    pub max_stop_length: usize,
    /// Most denoising steps per block a request may ask for.
    #[arg(long, env = "BD3LM_MAX_STEPS", default_value_t = Limits::DEFAULT.max_steps)]
    pub max_steps: usize,
    /// Largest request message, in bytes.
    #[arg(long, env = "BD3LM_MAX_REQUEST_BYTES", default_value_t = Limits::DEFAULT.max_request_bytes)]
    pub max_request_bytes: usize,
    /// Most live sessions one API key holds (with --api-keys); a new session beyond it is
    /// RESOURCE_EXHAUSTED until one is deleted or expires.
    #[arg(long, env = "BD3LM_MAX_SESSIONS_PER_KEY", default_value_t = Limits::DEFAULT.max_sessions_per_key)]
    pub max_sessions_per_key: usize,
}

impl Limits {
    /// The defaults, one place for the flags and for `Default`.
    pub const DEFAULT: Limits = Limits {
        max_prompt_tokens: 8192,
        max_new_tokens: 8192,
        max_total_tokens: 65536,
        max_stop_sequences: 16,
        max_stop_length: 256,
        max_steps: 1024,
        max_request_bytes: 1 << 20,
        max_sessions_per_key: 10_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a request was refused; the message starts with the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// `max_new_tokens` is 0.
    #[error("max_new_tokens: must be at least 1")]
    NoNewTokens,
    /// `max_new_tokens` is over the limit.
    #[error("max_new_tokens: {found} exceeds the limit of {limit}")]
    TooManyNewTokens {
        /// The value asked for.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// The session would grow past its limit.
    #[error("max_new_tokens: the session would hold {found} tokens, over the limit of {limit}")]
    SessionTooLong {
        /// Tokens the session would hold.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Too many stop sequences.
    #[error("stop: {found} stop sequences exceed the limit of {limit}")]
    TooManyStops {
        /// Stop sequences given (text and tokens).
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A stop sequence is empty or too long.
    #[error("{field}: stop sequences must have 1 to {limit} {unit}, found {found}")]
    StopLength {
        /// `stop` or `stop_token_ids`.
        field: &'static str,
        /// `bytes` or `tokens`.
        unit: &'static str,
        /// The limit.
        limit: usize,
        /// The offending length.
        found: usize,
    },
    /// Text stop sequences without a tokenizer.
    #[error("stop: text stop sequences need the server's tokenizer; use stop_token_ids")]
    TextStopWithoutTokenizer,
    /// A token id outside the vocabulary, or the mask id.
    #[error("{field}: token id {id} is the mask id or outside the vocabulary of {vocab_size}")]
    BadTokenId {
        /// Where the id was.
        field: &'static str,
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: u32,
    },
    /// The prompt text could not be tokenized.
    #[error("prompt.text: {0}")]
    Tokenize(String),
    /// The prompt is over the limit.
    #[error("prompt: {found} tokens exceed the limit of {limit}")]
    PromptTooLong {
        /// Prompt tokens.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A new session without a prompt.
    #[error("prompt: required to start a session (text or token_ids, not empty)")]
    PromptRequired,
    /// A session id of the wrong length or characters.
    #[error(
        "session_id: must be 32 lowercase hex digits, as the server gave it, found {found} characters"
    )]
    BadSessionId {
        /// Its length.
        found: usize,
    },
    /// More denoising steps than the server allows.
    #[error("sampling.steps: {found} exceeds the limit of {limit}")]
    TooManySteps {
        /// Steps asked for.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A sampling parameter out of its range.
    #[error("sampling.{}: expected {}, found {}", .0.field, .0.expected, .0.found)]
    Sampling(#[from] ParamError),
    /// A `kv_persistence` this server does not know.
    #[error("kv_persistence: expected 0 to 3, found {0}")]
    UnknownPersistence(i32),
}

/// What a new session starts from or a continuation appends.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A new session from `prompt`, seeded with `seed`.
    New {
        /// The prompt's tokens, BOS included for a text prompt.
        prompt: Vec<u32>,
        /// Seed of every random draw.
        seed: u64,
    },
    /// A continuation of `session_id`, with `appended` tokens (possibly none).
    Continue {
        /// The session.
        session_id: String,
        /// Tokens appended after what the session committed.
        appended: Vec<u32>,
    },
}

/// A request that passed every check that needs no session record.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// New session or continuation.
    pub target: Target,
    /// Sampling parameters the request sets.
    pub sampling: SamplingOverrides,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Text stop sequences.
    pub stop: Vec<String>,
    /// Token stop sequences.
    pub stop_token_ids: Vec<Vec<u32>>,
    /// Stop on EOS or low entropy.
    pub stop_on_eos: bool,
    /// When the session's KV state is written to the store; `None`: the deployment's
    /// default.
    pub kv_persistence: Option<Persistence>,
}

/// The model facts validation needs.
pub struct Vocabulary<'a> {
    /// Vocabulary size, mask included.
    pub size: u32,
    /// The mask id.
    pub mask_id: u32,
    /// Tokenizer and special ids.
    pub text: &'a Text,
}

/// Checks `req` against `limits` and the model's vocabulary.
pub fn validate(
    req: GenerateRequest,
    limits: &Limits,
    vocab: &Vocabulary<'_>,
) -> Result<ValidRequest, ValidationError> {
    let max_new_tokens = req.max_new_tokens as usize;
    if max_new_tokens == 0 {
        return Err(ValidationError::NoNewTokens);
    }
    if max_new_tokens > limits.max_new_tokens {
        return Err(ValidationError::TooManyNewTokens {
            found: max_new_tokens,
            limit: limits.max_new_tokens,
        });
    }
    check_stops(&req, limits, vocab)?;
    let kv_persistence =
        Persistence::from_wire(req.kv_persistence).map_err(ValidationError::UnknownPersistence)?;
    let sampling = match &req.sampling {
        Some(p) => SamplingOverrides::try_from(p)?,
        None => SamplingOverrides::default(),
    };
    if let Some(steps) = sampling.steps {
        check_steps(steps, limits)?;
    }
    let new_session = req.session_id.is_empty();
    let prompt = match &req.prompt {
        Some(Prompt::Text(t)) if new_session => vocab.text.encode_prompt(t),
        Some(Prompt::Text(t)) => vocab.text.encode(t),
        Some(Prompt::TokenIds(ids)) => Ok(ids.ids.clone()),
        None => Ok(Vec::new()),
    }
    .map_err(|e| ValidationError::Tokenize(e.to_string()))?;
    check_ids("prompt.token_ids", &prompt, vocab)?;
    if prompt.len() > limits.max_prompt_tokens {
        return Err(ValidationError::PromptTooLong {
            found: prompt.len(),
            limit: limits.max_prompt_tokens,
        });
    }
    let target = if new_session {
        if prompt.is_empty() {
            return Err(ValidationError::PromptRequired);
        }
        Target::New {
            prompt,
            seed: req.seed.unwrap_or_else(rand::random),
        }
    } else {
        check_session_id(&req.session_id)?;
        Target::Continue {
            session_id: req.session_id,
            appended: prompt,
        }
    };
    Ok(ValidRequest {
        target,
        sampling,
        max_new_tokens,
        stop: req.stop,
        stop_token_ids: req.stop_token_ids.into_iter().map(|s| s.ids).collect(),
        stop_on_eos: req.stop_on_eos,
        kv_persistence,
    })
}

impl ValidRequest {
    /// The second phase for a new session of `prompt_len` tokens on a model of
    /// `block_size`: its sampling parameters (the block size's defaults under the
    /// request's overrides), and the length it would reach checked.
    pub fn new_session(
        &self,
        prompt_len: usize,
        block_size: usize,
        limits: &Limits,
    ) -> Result<SamplingParams, ValidationError> {
        let defaults = SamplingParams::new(block_size);
        let sampling = sampling(&self.sampling, &defaults, limits)?;
        session_length(prompt_len, self.max_new_tokens, limits)?;
        Ok(sampling)
    }

    /// The second phase for a continuation, on `record` as it will be written (the
    /// request's tokens appended): the session's sampling parameters under the request's
    /// overrides, and the length it would reach checked.
    pub fn continuation(
        &self,
        record: &SessionRecord,
        limits: &Limits,
    ) -> Result<SamplingParams, ValidationError> {
        let sampling = sampling(&self.sampling, &record.sampling, limits)?;
        session_length(record.returned, self.max_new_tokens, limits)?;
        Ok(sampling)
    }
}

/// The sampling parameters `base` after `overrides`.
fn sampling(
    overrides: &SamplingOverrides,
    base: &SamplingParams,
    limits: &Limits,
) -> Result<SamplingParams, ValidationError> {
    let params = overrides.apply(base)?;
    check_steps(params.steps, limits)?;
    Ok(params)
}

/// Checks that a session holding `returned` tokens may generate `max_new_tokens` more.
fn session_length(
    returned: usize,
    max_new_tokens: usize,
    limits: &Limits,
) -> Result<(), ValidationError> {
    let found = returned + max_new_tokens;
    if found > limits.max_total_tokens {
        return Err(ValidationError::SessionTooLong {
            found,
            limit: limits.max_total_tokens,
        });
    }
    Ok(())
}

/// Checks a session id: what the server generates (hex) and what a client may name.
pub fn check_session_id(id: &str) -> Result<(), ValidationError> {
    if bd3lm_kvstore::record::is_session_id(id) {
        Ok(())
    } else {
        Err(ValidationError::BadSessionId {
            found: id.chars().count(),
        })
    }
}

fn check_steps(steps: usize, limits: &Limits) -> Result<(), ValidationError> {
    if steps > limits.max_steps {
        return Err(ValidationError::TooManySteps {
            found: steps,
            limit: limits.max_steps,
        });
    }
    Ok(())
}

fn check_stops(
    req: &GenerateRequest,
    limits: &Limits,
    vocab: &Vocabulary<'_>,
) -> Result<(), ValidationError> {
    let found = req.stop.len() + req.stop_token_ids.len();
    if found > limits.max_stop_sequences {
        return Err(ValidationError::TooManyStops {
            found,
            limit: limits.max_stop_sequences,
        });
    }
    let limit = limits.max_stop_length;
    let lengths = req.stop.iter().map(|s| ("stop", "bytes", s.len())).chain(
        req.stop_token_ids
            .iter()
            .map(|s| ("stop_token_ids", "tokens", s.ids.len())),
    );
    for (field, unit, found) in lengths {
        if found == 0 || found > limit {
            return Err(ValidationError::StopLength {
                field,
                unit,
                limit,
                found,
            });
        }
    }
    for seq in &req.stop_token_ids {
        check_ids("stop_token_ids", &seq.ids, vocab)?;
    }
    if !req.stop.is_empty() && !vocab.text.has_tokenizer() {
        return Err(ValidationError::TextStopWithoutTokenizer);
    }
    Ok(())
}

fn check_ids(
    field: &'static str,
    ids: &[u32],
    vocab: &Vocabulary<'_>,
) -> Result<(), ValidationError> {
    match ids.iter().find(|&&t| t >= vocab.size || t == vocab.mask_id) {
        Some(&id) => Err(ValidationError::BadTokenId {
            field,
            id,
            vocab_size: vocab.size,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_proto::v1::{SamplingParameters, TokenIds};
    use bd3lm_sampling::Sampler;

    fn request() -> GenerateRequest {
        GenerateRequest {
            max_new_tokens: 8,
            prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2] })),
            ..Default::default()
        }
    }

    fn check(req: GenerateRequest) -> Result<ValidRequest, ValidationError> {
        let text = Text::load(None, 1024).unwrap();
        let vocab = Vocabulary {
            size: 1024,
            mask_id: 1023,
            text: &text,
        };
        validate(req, &Limits::default(), &vocab)
    }

    fn sampling_request(p: SamplingParameters) -> GenerateRequest {
        GenerateRequest {
            sampling: Some(p),
            ..request()
        }
    }

    /// Mutated wire bytes of requests decode or not; those that decode are validated and
    /// their sampling merged, never with a panic.
    #[test]
    fn fuzzed_requests_never_panic() {
        use prost::Message;
        let seeds: Vec<Vec<u8>> = [
            request(),
            sampling_request(SamplingParameters {
                sampler: bd3lm_proto::v1::Sampler::Confidence as i32,
                steps: Some(4),
                top_p: Some(0.9),
                threshold: Some(0.5),
                temperature: Some(0.7),
                top_k: Some(5),
                greedy: Some(false),
            }),
            GenerateRequest {
                stop: vec!["ab".into()],
                stop_token_ids: vec![TokenIds { ids: vec![3, 4] }],
                session_id: format!("{:032x}", 7),
                prompt: Some(Prompt::Text("hi".into())),
                seed: Some(3),
                ..request()
            },
        ]
        .iter()
        .map(Message::encode_to_vec)
        .collect();
        let base = bd3lm_sampling::SamplingParams::new(4);
        let budget = std::time::Duration::from_secs(2);
        bd3lm_bytes::fuzz::fuzz("request validation", &seeds, budget, |bytes| {
            let Ok(req) = GenerateRequest::decode(bytes) else {
                return;
            };
            if let Ok(valid) = check(req) {
                let limits = Limits::default();
                let _ = sampling(&valid.sampling, &SamplingParams::new(16), &limits);
                let _ = sampling(&valid.sampling, &base, &limits);
            }
        });
    }

    #[test]
    fn every_refusal_names_its_field() {
        let ids = |ids: Vec<u32>| Some(Prompt::TokenIds(TokenIds { ids }));
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (
                GenerateRequest {
                    max_new_tokens: 0,
                    ..request()
                },
                "max_new_tokens",
            ),
            (
                GenerateRequest {
                    max_new_tokens: 1 << 30,
                    ..request()
                },
                "max_new_tokens",
            ),
            (
                GenerateRequest {
                    stop: vec![String::new()],
                    ..request()
                },
                "stop",
            ),
            (
                GenerateRequest {
                    stop: vec!["x".into(); 40],
                    ..request()
                },
                "stop",
            ),
            (
                GenerateRequest {
                    stop: vec!["x".into()],
                    ..request()
                },
                "stop",
            ),
            (
                GenerateRequest {
                    stop_token_ids: vec![TokenIds { ids: vec![] }],
                    ..request()
                },
                "stop_token_ids",
            ),
            (
                GenerateRequest {
                    stop_token_ids: vec![TokenIds { ids: vec![5000] }],
                    ..request()
                },
                "stop_token_ids",
            ),
            (
                GenerateRequest {
                    prompt: ids(vec![1, 1023]),
                    ..request()
                },
                "prompt.token_ids",
            ),
            (
                GenerateRequest {
                    prompt: ids(vec![1; 9000]),
                    ..request()
                },
                "prompt",
            ),
            (
                GenerateRequest {
                    prompt: None,
                    ..request()
                },
                "prompt",
            ),
            (
                GenerateRequest {
                    session_id: "a:b".into(),
                    ..request()
                },
                "session_id",
            ),
            (
                GenerateRequest {
                    session_id: "x".repeat(129),
                    ..request()
                },
                "session_id",
            ),
            (
                sampling_request(SamplingParameters {
                    steps: Some(5000),
                    ..Default::default()
                }),
                "sampling.steps",
            ),
            (
                sampling_request(SamplingParameters {
                    sampler: 42,
                    ..Default::default()
                }),
                "sampling.sampler",
            ),
            (
                sampling_request(SamplingParameters {
                    temperature: Some(0.0),
                    ..Default::default()
                }),
                "sampling.temperature",
            ),
        ];
        for (req, field) in cases {
            let e = check(req)
                .map(|v| sampling(&v.sampling, &SamplingParams::new(4), &Limits::default()));
            let message = match e {
                Err(e) | Ok(Err(e)) => crate::Error::from(e).into_status().message().to_string(),
                Ok(Ok(_)) => panic!("{field}: accepted"),
            };
            assert!(message.starts_with(field), "{field}: {message}");
        }
        assert!(check(request()).is_ok());
    }

    #[test]
    fn sampling_defaults_ranges_and_continuation() {
        let limits = Limits::default();
        let s = sampling(
            &SamplingOverrides::default(),
            &SamplingParams::new(4),
            &limits,
        )
        .unwrap();
        assert_eq!(s, SamplingParams::new(4));
        let bad = |p: SamplingParameters, field: &str| {
            let o = SamplingOverrides::try_from(&p).unwrap();
            let e = sampling(&o, &SamplingParams::new(4), &limits)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(field), "{e}");
        };
        bad(
            SamplingParameters {
                top_p: Some(1.5),
                ..Default::default()
            },
            "sampling.top_p",
        );
        bad(
            SamplingParameters {
                steps: Some(0),
                ..Default::default()
            },
            "sampling.steps",
        );
        bad(
            SamplingParameters {
                threshold: Some(-0.1),
                sampler: 3,
                ..Default::default()
            },
            "sampling.threshold",
        );
        let previous = SamplingParams {
            sampler: Sampler::Ddpm,
            ..s
        };
        let kept = sampling(
            &SamplingOverrides {
                top_k: Some(Some(5)),
                ..Default::default()
            },
            &previous,
            &limits,
        )
        .unwrap();
        assert_eq!((kept.sampler, kept.filter.top_k), (Sampler::Ddpm, Some(5)));
        assert!(session_length(65530, 6, &limits).is_ok());
        assert!(
            session_length(65530, 7, &limits)
                .unwrap_err()
                .to_string()
                .contains("65537")
        );
    }
}
