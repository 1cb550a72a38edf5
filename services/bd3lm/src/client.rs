//! `bd3lm generate --addr`: a streaming client of the Generation service.

use std::io::Write;
use std::time::Instant;

use bd3lm_coordinator::Persistence;
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{GenerateRequest, SamplingParameters, StopReason, TokenIds};
use bd3lm_sampling::SamplingOverrides;

use crate::args::{GenerateArgs, GenerationArgs};

/// The request the generation flags describe, continuing `session` when given, its KV
/// state written as `persistence` says (else as the server's default).
pub fn request(
    args: &GenerationArgs,
    session: Option<String>,
    persistence: Option<Persistence>,
) -> GenerateRequest {
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => Some(Prompt::Text(text.clone())),
        (None, Some(ids)) => Some(Prompt::TokenIds(TokenIds { ids: ids.clone() })),
        (None, None) => None,
    };
    // Only what was asked for: the server fills in its defaults, or a continued
    // session's own parameters.
    let sampling = args.sampling.overrides();
    GenerateRequest {
        prompt,
        session_id: session.unwrap_or_default(),
        max_new_tokens: args.max_tokens.min(u32::MAX as usize) as u32,
        sampling: (sampling != SamplingOverrides::default())
            .then(|| SamplingParameters::from(&sampling)),
        seed: args.seed,
        stop: args.stop.clone(),
        stop_token_ids: args
            .stop_ids
            .iter()
            .map(|ids| TokenIds { ids: ids.clone() })
            .collect(),
        stop_on_eos: args.var_length,
        kv_persistence: persistence.map_or(0, |p| p.to_wire() as i32),
        priority: 0,
        model: String::new(),
    }
}

/// Streams the generation `args` describe from the server at `addr` (with its API key
/// and TLS files, when given) to stdout, with a summary on stderr.
pub async fn generate(addr: &str, args: &GenerateArgs) -> anyhow::Result<()> {
    let (api_key, tls) = (args.api_key.as_deref(), &args.tls);
    let mut client = GenerationClient::new(crate::remote::connect(addr, api_key, tls).await?);
    let started = Instant::now();
    let request = GenerateRequest {
        priority: args.priority,
        model: args.served_model.clone().unwrap_or_default(),
        ..request(&args.generation, args.session.clone(), args.kv_persistence)
    };
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(crate::remote::status)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let (mut tokens, mut blocks) = (0usize, 0usize);
    while let Some(message) = stream.message().await.map_err(crate::remote::status)? {
        if message.text.is_empty() {
            for id in &message.token_ids {
                let _ = write!(stdout, "{id} ");
            }
        } else {
            let _ = write!(stdout, "{}", message.text);
        }
        let _ = stdout.flush();
        tokens += message.token_ids.len();
        blocks += message.block.is_some() as usize;
        if message.stop_reason != StopReason::Unspecified as i32 {
            let _ = writeln!(stdout);
            let reason = StopReason::try_from(message.stop_reason)
                .map_or("unknown".into(), |r| r.as_str_name().to_lowercase());
            eprintln!(
                "tokens {tokens}, {:.1} tokens/s, forward passes {} ({:.2} per token), blocks {blocks}, stop {}, seed {}, session {}",
                tokens as f64 / started.elapsed().as_secs_f64(),
                message.forward_passes,
                message.forward_passes as f64 / tokens.max(1) as f64,
                reason.trim_start_matches("stop_reason_"),
                message.seed,
                message.session_id
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse;

    /// A continuation without sampling flags sends no sampling parameters, so the session
    /// keeps its own (a greedy session stays greedy).
    #[test]
    fn a_continuation_sends_only_the_flags_given() {
        let req = request(&parse(&["--max-tokens", "8"]), Some("s1".into()), None);
        assert_eq!((req.session_id.as_str(), req.sampling), ("s1", None));
        let sent = request(&parse(&["--top-k", "0"]), None, None)
            .sampling
            .unwrap();
        assert_eq!(
            (sent.top_k, sent.greedy, sent.temperature),
            (Some(0), None, None)
        );
    }
}
