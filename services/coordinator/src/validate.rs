//! Request validation: every limit and parameter range, each failure an INVALID_ARGUMENT
//! naming the field.

use bd3lm_kvstore::SamplingRecord;
use bd3lm_proto::v1::{GenerateRequest, Sampler, SamplingParameters};
use tonic::Status;

/// Limits on what one request may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most prompt tokens.
    pub max_prompt_tokens: usize,
    /// Most new tokens per request.
    pub max_new_tokens: usize,
    /// Most tokens in a session (prompts and generated).
    pub max_total_tokens: usize,
    /// Most stop sequences (text and token ones together).
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in bytes or tokens.
    pub max_stop_length: usize,
    /// Most denoising steps per block.
    pub max_steps: usize,
    /// Largest request message, in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 8192,
            max_new_tokens: 8192,
            max_total_tokens: 65536,
            max_stop_sequences: 16,
            max_stop_length: 256,
            max_steps: 1024,
            max_request_bytes: 1 << 20,
        }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// Checks the parts of a request that need no model information.
pub fn check_request(req: &GenerateRequest, limits: &Limits) -> Result<(), Status> {
    if req.max_new_tokens == 0 {
        return Err(invalid("max_new_tokens", "must be at least 1"));
    }
    if req.max_new_tokens as usize > limits.max_new_tokens {
        return Err(invalid(
            "max_new_tokens",
            format!(
                "{} exceeds the limit of {}",
                req.max_new_tokens, limits.max_new_tokens
            ),
        ));
    }
    let stops = req.stop.len() + req.stop_token_ids.len();
    if stops > limits.max_stop_sequences {
        return Err(invalid(
            "stop",
            format!(
                "{stops} stop sequences exceed the limit of {}",
                limits.max_stop_sequences
            ),
        ));
    }
    if req
        .stop
        .iter()
        .any(|s| s.is_empty() || s.len() > limits.max_stop_length)
    {
        return Err(invalid(
            "stop",
            format!(
                "stop sequences must have 1 to {} bytes",
                limits.max_stop_length
            ),
        ));
    }
    if req
        .stop_token_ids
        .iter()
        .any(|s| s.ids.is_empty() || s.ids.len() > limits.max_stop_length)
    {
        return Err(invalid(
            "stop_token_ids",
            format!(
                "stop sequences must have 1 to {} tokens",
                limits.max_stop_length
            ),
        ));
    }
    Ok(())
}

/// Checks token ids against the vocabulary.
pub fn check_ids(field: &str, ids: &[u32], vocab_size: u32, mask_id: u32) -> Result<(), Status> {
    match ids.iter().find(|&&t| t >= vocab_size || t == mask_id) {
        Some(bad) => Err(invalid(
            field,
            format!("token id {bad} is the mask id or outside the vocabulary of {vocab_size}"),
        )),
        None => Ok(()),
    }
}

/// The sampling parameters to store: the request's, the session's for unset fields of a
/// continuation, else the defaults; every range checked.
pub fn sampling(
    params: Option<&SamplingParameters>,
    previous: Option<&SamplingRecord>,
    block_size: usize,
    limits: &Limits,
) -> Result<SamplingRecord, Status> {
    let default = SamplingRecord {
        sampler: "first-hitting".into(),
        steps: block_size,
        threshold: 0.9,
        temperature: 1.0,
        top_p: 0.9,
        top_k: None,
        greedy: false,
    };
    let base = previous.cloned().unwrap_or(default);
    let Some(p) = params else { return Ok(base) };
    let sampler = match Sampler::try_from(p.sampler)
        .map_err(|_| invalid("sampling.sampler", format!("unknown value {}", p.sampler)))?
    {
        Sampler::Unspecified => base.sampler.clone(),
        Sampler::Ddpm => "ddpm".into(),
        Sampler::FirstHitting => "first-hitting".into(),
        Sampler::Confidence => "confidence".into(),
    };
    let record = SamplingRecord {
        sampler,
        steps: p.steps.map_or(base.steps, |s| s as usize),
        threshold: p.threshold.unwrap_or(base.threshold),
        temperature: p.temperature.unwrap_or(base.temperature),
        top_p: p.top_p.unwrap_or(base.top_p),
        top_k: match p.top_k {
            Some(0) | None => base.top_k,
            Some(k) => Some(k as usize),
        },
        greedy: p.greedy,
    };
    if record.steps == 0 || record.steps > limits.max_steps {
        return Err(invalid(
            "sampling.steps",
            format!("must be 1 to {}, found {}", limits.max_steps, record.steps),
        ));
    }
    if !(record.temperature > 0.0 && record.temperature.is_finite()) {
        return Err(invalid(
            "sampling.temperature",
            format!("must be a finite value > 0, found {}", record.temperature),
        ));
    }
    if !(record.top_p > 0.0 && record.top_p <= 1.0) {
        return Err(invalid(
            "sampling.top_p",
            format!("must be in (0, 1], found {}", record.top_p),
        ));
    }
    if !(0.0..=1.0).contains(&record.threshold) {
        return Err(invalid(
            "sampling.threshold",
            format!("must be in [0, 1], found {}", record.threshold),
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_proto::v1::TokenIds;

    fn request() -> GenerateRequest {
        GenerateRequest {
            max_new_tokens: 8,
            ..Default::default()
        }
    }

    #[test]
    fn limits_name_the_field() {
        let limits = Limits::default();
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
                    stop_token_ids: vec![TokenIds { ids: vec![] }],
                    ..request()
                },
                "stop_token_ids",
            ),
        ];
        for (req, field) in cases {
            let status = check_request(&req, &limits).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
        assert!(check_request(&request(), &limits).is_ok());
        assert!(
            check_ids("prompt.token_ids", &[1, 2, 1023], 1024, 1023)
                .unwrap_err()
                .message()
                .contains("1023")
        );
    }

    #[test]
    fn sampling_defaults_ranges_and_continuation() {
        let limits = Limits::default();
        let s = sampling(None, None, 4, &limits).unwrap();
        assert_eq!(
            (s.sampler.as_str(), s.steps, s.top_p),
            ("first-hitting", 4, 0.9)
        );
        let bad = |p: SamplingParameters, field: &str| {
            let e = sampling(Some(&p), None, 4, &limits).unwrap_err();
            assert!(e.message().starts_with(field), "{}", e.message());
        };
        bad(
            SamplingParameters {
                temperature: Some(0.0),
                ..Default::default()
            },
            "sampling.temperature",
        );
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
                ..Default::default()
            },
            "sampling.threshold",
        );
        bad(
            SamplingParameters {
                sampler: 42,
                ..Default::default()
            },
            "sampling.sampler",
        );
        let previous = SamplingRecord {
            sampler: "ddpm".into(),
            ..s
        };
        let kept = sampling(
            Some(&SamplingParameters {
                top_k: Some(5),
                ..Default::default()
            }),
            Some(&previous),
            4,
            &limits,
        )
        .unwrap();
        assert_eq!((kept.sampler.as_str(), kept.top_k), ("ddpm", Some(5)));
    }
}
