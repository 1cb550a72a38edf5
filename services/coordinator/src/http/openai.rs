//! OpenAI's request bodies onto a `GenerateRequest`, and its responses from the stream's
//! messages. Every field is read by name, so a bad one is a 400 naming it; a field this
//! server does not serve (`logprobs`, `response_format`, `tools`, penalties...) is
//! refused by name rather than ignored. The block diffusion controls are extra body
//! fields, as vLLM takes its own: `sampler`, `steps`, `threshold`, `top_k`, `greedy`,
//! `stop_on_eos`, `priority` and `session_id` (continue a session).

use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::{GenerateRequest, Sampler, SamplingParameters, StopReason, TokenIds};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::error::ApiError;

/// A JSON request body, read field by field; what is left at the end is refused.
pub struct Fields(Map<String, Value>);

impl Fields {
    /// The body's fields: a JSON object, or a 400.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice(body) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::invalid("body", "expected a JSON object")),
            Err(e) => Err(ApiError::invalid("body", format!("not valid JSON ({e})"))),
        }
    }

    /// Field `name`, absent or null as `None`; a value of the wrong type is a 400
    /// naming it.
    pub fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value)
                .map(Some)
                .map_err(|e| ApiError::invalid(name, format!("has the wrong type ({e})"))),
        }
    }

    /// Field `name` as a string, left in place; `None` when absent or not a string.
    pub fn peek_str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// Sets field `name` (a request's alias of it read first).
    pub fn insert(&mut self, name: &str, value: Value) {
        self.0.insert(name.to_string(), value);
    }

    /// Field `name`, which may only take its default (`allowed`): any other value is a
    /// 400 saying the server does not support it.
    fn only<T: DeserializeOwned + PartialEq>(
        &mut self,
        name: &str,
        allowed: impl Fn(&T) -> bool,
    ) -> Result<(), ApiError> {
        match self.take::<T>(name)? {
            Some(value) if !allowed(&value) => Err(ApiError::unsupported(name)),
            _ => Ok(()),
        }
    }

    /// Refuses the first field left unread (by name, in order).
    pub fn finish(self) -> Result<(), ApiError> {
        let left = self.0.into_iter().find(|(_, v)| !v.is_null());
        match left {
            Some((name, _)) => Err(ApiError::unsupported(&name)),
            None => Ok(()),
        }
    }
}

/// What a completion request asks beside the generation itself.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The model named.
    pub model: String,
    /// Server-Sent Events, one chunk per committed block.
    pub stream: bool,
    /// A usage chunk before `[DONE]` (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// The stream options OpenAI defines.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A `/v1/completions` body: the generation, and its shape.
pub fn completion(mut fields: Fields) -> Result<(GenerateRequest, Shape), ApiError> {
    let prompt = prompt(fields.take::<Value>("prompt")?)?;
    let (request, shape) = common(&mut fields, prompt)?;
    fields.only::<bool>("echo", |e| !e)?;
    fields.only::<String>("suffix", String::is_empty)?;
    fields.only::<u32>("best_of", |b| *b == 1)?;
    fields.only::<Value>("logprobs", |_| false)?;
    fields.finish()?;
    Ok((request, shape))
}

/// The fields completions and chat completions share, onto a request of `prompt`.
pub fn common(
    fields: &mut Fields,
    prompt: Option<Prompt>,
) -> Result<(GenerateRequest, Shape), ApiError> {
    let model = fields
        .take::<String>("model")?
        .ok_or_else(|| ApiError::invalid("model", "required"))?;
    let max_tokens = fields.take::<u32>("max_tokens")?.unwrap_or(16);
    if max_tokens == 0 {
        return Err(ApiError::invalid("max_tokens", "must be at least 1"));
    }
    let stream = fields.take::<bool>("stream")?.unwrap_or(false);
    let include_usage = fields
        .take::<StreamOptions>("stream_options")?
        .is_some_and(|o| o.include_usage);
    fields.only::<u32>("n", |n| *n == 1)?;
    fields.only::<f64>("presence_penalty", |p| *p == 0.0)?;
    fields.only::<f64>("frequency_penalty", |p| *p == 0.0)?;
    fields.only::<Map<String, Value>>("logit_bias", Map::is_empty)?;
    // Who the end user is: OpenAI's abuse-monitoring id, neither stored nor logged here.
    fields.take::<String>("user")?;
    let request = GenerateRequest {
        prompt,
        model: model.clone(),
        session_id: fields.take("session_id")?.unwrap_or_default(),
        max_new_tokens: max_tokens,
        sampling: Some(sampling(fields)?),
        seed: fields.take("seed")?,
        stop: stop(fields.take("stop")?)?,
        stop_on_eos: fields.take("stop_on_eos")?.unwrap_or(false),
        priority: fields.take("priority")?.unwrap_or(0),
        ..Default::default()
    };
    let shape = Shape {
        model,
        stream,
        include_usage,
    };
    Ok((request, shape))
}

/// The sampling fields: OpenAI's `temperature` (0: greedy) and `top_p`, and the block
/// diffusion controls.
fn sampling(fields: &mut Fields) -> Result<SamplingParameters, ApiError> {
    let mut sampling = SamplingParameters::default();
    if let Some(t) = fields.take::<f64>("temperature")? {
        if !(t.is_finite() && t >= 0.0) {
            return Err(ApiError::invalid("temperature", "must be at least 0"));
        }
        // OpenAI's temperature 0 is the most likely token each time.
        if t == 0.0 {
            sampling.greedy = Some(true);
        } else {
            sampling.temperature = Some(t);
        }
    }
    if let Some(p) = fields.take::<f64>("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid("top_p", "must be in (0, 1]"));
        }
        sampling.top_p = Some(p);
    }
    if let Some(greedy) = fields.take::<bool>("greedy")? {
        sampling.greedy = Some(greedy || sampling.greedy.unwrap_or(false));
    }
    sampling.steps = fields.take("steps")?;
    sampling.threshold = fields.take("threshold")?;
    sampling.top_k = fields.take("top_k")?;
    if let Some(name) = fields.take::<String>("sampler")? {
        sampling.sampler = match name.as_str() {
            "ddpm" => Sampler::Ddpm,
            "first_hitting" => Sampler::FirstHitting,
            "confidence" => Sampler::Confidence,
            _ => {
                return Err(ApiError::invalid(
                    "sampler",
                    "one of ddpm, first_hitting, confidence",
                ));
            }
        } as i32;
    }
    Ok(sampling)
}

/// A completion's `prompt`: a string, token ids, or a batch of one of either.
fn prompt(value: Option<Value>) -> Result<Option<Prompt>, ApiError> {
    let invalid = || {
        ApiError::invalid(
            "prompt",
            "a string or an array of token ids (one prompt per request)",
        )
    };
    Ok(match value {
        None => None,
        Some(Value::String(text)) => Some(Prompt::Text(text)),
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            let ids = items.iter().map(|i| u32::try_from(i.as_u64()?).ok());
            let ids = ids.collect::<Option<Vec<u32>>>().ok_or_else(invalid)?;
            Some(Prompt::TokenIds(TokenIds { ids }))
        }
        // A batch of one.
        Some(Value::Array(mut items)) if items.len() == 1 => prompt(items.pop())?,
        Some(_) => return Err(invalid()),
    })
}

/// `stop`: a string or up to four of them.
fn stop(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid("stop", "a string or an array of strings")),
            })
            .collect(),
        Some(_) => Err(ApiError::invalid("stop", "a string or an array of strings")),
    }
}

/// OpenAI's `finish_reason` of a stop reason: `length` when the token budget ran out,
/// `stop` for the end of sequence and stop sequences; `None` while the stream goes on.
pub fn finish_reason(stop: i32) -> Option<&'static str> {
    match StopReason::try_from(stop).ok()? {
        StopReason::Unspecified | StopReason::Cancelled => None,
        StopReason::MaxTokens => Some("length"),
        StopReason::Eos | StopReason::LowEntropy | StopReason::StopSequence => Some("stop"),
    }
}

/// The `usage` object.
pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: Value) -> Fields {
        Fields::parse(body.to_string().as_bytes()).unwrap()
    }

    fn param(e: ApiError) -> String {
        e.body()["error"]["param"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A completion body maps onto the request: the prompt, the budget, OpenAI's and the
    /// block diffusion's sampling controls, the stream and its usage chunk.
    #[test]
    fn a_completion_maps_onto_the_request() {
        let body = json!({
            "model": "demo", "prompt": "Once", "max_tokens": 8, "temperature": 0.7,
            "top_p": 0.9, "seed": 3, "stop": ["\n"], "stream": true, "user": "u",
            "stream_options": {"include_usage": true}, "steps": 4, "sampler": "confidence",
            "threshold": 0.8, "top_k": 5, "session_id": "", "logprobs": null, "n": 1,
        });
        let (request, shape) = completion(fields(body)).unwrap();
        assert_eq!(request.prompt, Some(Prompt::Text("Once".into())));
        assert_eq!((request.max_new_tokens, request.seed), (8, Some(3)));
        assert_eq!(request.stop, vec!["\n".to_string()]);
        let s = request.sampling.unwrap();
        assert_eq!(
            (s.temperature, s.top_p, s.steps),
            (Some(0.7), Some(0.9), Some(4))
        );
        assert_eq!((s.sampler, s.top_k), (Sampler::Confidence as i32, Some(5)));
        assert!(shape.stream && shape.include_usage && shape.model == "demo");

        let (ids, _) = completion(fields(json!({"model": "m", "prompt": [[1, 2]]}))).unwrap();
        assert_eq!(
            ids.prompt,
            Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2] }))
        );
        assert_eq!(ids.max_new_tokens, 16, "OpenAI's default");
        let (greedy, _) = completion(fields(
            json!({"model": "m", "prompt": "x", "temperature": 0}),
        ))
        .unwrap();
        assert_eq!(greedy.sampling.unwrap().greedy, Some(true));
    }

    /// Bad and unsupported fields are refused by name.
    #[test]
    fn bad_and_unsupported_fields_are_named() {
        let cases = [
            (json!({"prompt": "x"}), "model"),
            (json!({"model": "m", "temperature": -1}), "temperature"),
            (json!({"model": "m", "temperature": "hot"}), "temperature"),
            (json!({"model": "m", "top_p": 0}), "top_p"),
            (json!({"model": "m", "max_tokens": 0}), "max_tokens"),
            (json!({"model": "m", "logprobs": 2}), "logprobs"),
            (json!({"model": "m", "n": 2}), "n"),
            (json!({"model": "m", "echo": true}), "echo"),
            (
                json!({"model": "m", "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (json!({"model": "m", "logit_bias": {"1": 2}}), "logit_bias"),
            (
                json!({"model": "m", "response_format": {"type": "json"}}),
                "response_format",
            ),
            (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
            (json!({"model": "m", "sampler": "beam"}), "sampler"),
            (json!({"model": "m", "stop": [1]}), "stop"),
        ];
        for (body, field) in cases {
            let e = completion(fields(body.clone())).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(param(e), field, "{body}");
        }
        assert!(Fields::parse(b"[1]").is_err());
        assert!(Fields::parse(b"{").is_err());
    }

    #[test]
    fn stop_reasons_are_finish_reasons() {
        assert_eq!(finish_reason(StopReason::MaxTokens as i32), Some("length"));
        assert_eq!(finish_reason(StopReason::StopSequence as i32), Some("stop"));
        assert_eq!(finish_reason(StopReason::Unspecified as i32), None);
        assert_eq!(usage(3, 4)["total_tokens"], 7);
    }
}
