//! `/v1/chat/completions`: the conversation rendered to one prompt by the named model's
//! chat template (`chat_template` of the `tokenizer_config.json` beside its tokenizer, a Jinja
//! template as Hugging Face ships them, rendered with minijinja). A model without one
//! answers 400: a chat cannot be turned into a prompt without knowing the model's format.

use std::path::Path;

use bd3lm_proto::v1::generate_request::Prompt;
use minijinja::{Environment, Error as TemplateError, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::openai::{Fields, Shape, common};
use bd3lm_proto::v1::GenerateRequest;

/// A model's chat template and the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// One message of a conversation, as the template sees it.
#[derive(Debug, Serialize)]
struct Message {
    role: String,
    content: String,
}

impl ChatTemplate {
    /// The template of the tokenizer at `tokenizer` (its directory's
    /// `tokenizer_config.json`); `None` when there is none, or it does not compile (which
    /// is logged).
    pub fn load(tokenizer: Option<&Path>) -> Option<Self> {
        let config = tokenizer?.parent()?.join("tokenizer_config.json");
        let text = std::fs::read_to_string(config).ok()?;
        let config: Value = serde_json::from_str(&text).ok()?;
        let source = match &config["chat_template"] {
            Value::String(s) => s.clone(),
            // Several named templates: the default one.
            Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")?
                .get("template")?
                .as_str()?
                .to_string(),
            _ => return None,
        };
        let special = |name: &str| match &config[name] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            _ => String::new(),
        };
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, TemplateError> {
                Err(TemplateError::new(ErrorKind::InvalidOperation, message))
            },
        );
        if let Err(e) = env.add_template_owned("chat", source) {
            tracing::warn!(error = %e, "the model's chat template does not compile; chat is off");
            return None;
        }
        Some(Self {
            env,
            bos: special("bos_token"),
            eos: special("eos_token"),
        })
    }

    /// The prompt of `messages`, ready for the assistant's turn. The server puts BOS in
    /// front of a new session's text itself: a leading one from the template is dropped.
    fn render(&self, messages: &[Message]) -> Result<String, ApiError> {
        let template = self.env.get_template("chat").expect("added at load");
        let rendered = template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| {
                ApiError::invalid("messages", format!("the chat template refused them: {e}"))
            })?;
        Ok(match rendered.strip_prefix(self.bos.as_str()) {
            Some(rest) if !self.bos.is_empty() => rest.to_string(),
            _ => rendered,
        })
    }
}

/// A `/v1/chat/completions` body: the conversation rendered by the template of the model
/// it names (`templates` gives a model's), and the request's shape.
pub fn completion<T: std::ops::Deref<Target = ChatTemplate>>(
    mut fields: Fields,
    templates: impl Fn(&str) -> Option<T>,
) -> Result<(GenerateRequest, Shape), ApiError> {
    let model = fields.peek_str("model").unwrap_or_default().to_string();
    let template = templates(&model).ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions with a prompt",
        )
    })?;
    let messages = messages(fields.take::<Vec<Value>>("messages")?)?;
    if fields
        .take::<String>("session_id")?
        .is_some_and(|s| !s.is_empty())
    {
        return Err(ApiError::invalid(
            "session_id",
            "a chat request carries the whole conversation; continue sessions with /v1/completions",
        ));
    }
    // OpenAI's newer name of the budget.
    if let Some(budget) = fields.take::<u32>("max_completion_tokens")? {
        fields.insert("max_tokens", budget.into());
    }
    let prompt = Prompt::Text(template.render(&messages)?);
    let (request, shape) = common(&mut fields, Some(prompt))?;
    for unsupported in [
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
    ] {
        if fields.take::<Value>(unsupported)?.is_some() {
            return Err(ApiError::unsupported(unsupported));
        }
    }
    fields.finish()?;
    Ok((request, shape))
}

/// The conversation: each message's role and text (a string, or text parts).
fn messages(given: Option<Vec<Value>>) -> Result<Vec<Message>, ApiError> {
    let given = given.filter(|m| !m.is_empty());
    let given = given.ok_or_else(|| ApiError::invalid("messages", "required: at least one"))?;
    given
        .into_iter()
        .map(|m| {
            let role = m["role"].as_str().filter(|r| !r.is_empty());
            let role = role.ok_or_else(|| ApiError::invalid("messages", "each needs a role"))?;
            let content = match &m["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(text)) => Ok(text),
                        _ => Err(ApiError::invalid(
                            "messages",
                            "only text content is supported",
                        )),
                    })
                    .collect::<Result<String, _>>()?,
                Value::Null => String::new(),
                _ => {
                    return Err(ApiError::invalid(
                        "messages",
                        "content is a string or text parts",
                    ));
                }
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(dir: &Path, config: Value) -> Option<ChatTemplate> {
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        ChatTemplate::load(Some(&dir.join("tokenizer.json")))
    }

    /// A conversation renders through the model's template (the template's BOS dropped:
    /// the server adds its own); a model without a template refuses chat naming
    /// `messages`; the template's own exceptions are 400s.
    #[test]
    fn conversations_render_through_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let source = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let chat = template(
            dir.path(),
            json!({"chat_template": source, "bos_token": {"content": "<s>"}}),
        )
        .unwrap();
        let body = json!({
            "model": "m",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_completion_tokens": 5,
        });
        let fields = Fields::parse(body.to_string().as_bytes()).unwrap();
        let (request, _) = completion(fields, |_| Some(&chat)).unwrap();
        let expected = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>";
        assert_eq!(request.prompt, Some(Prompt::Text(expected.into())));
        assert_eq!(request.max_new_tokens, 5);

        // The template is the named model's: another model's lack refuses the chat.
        let other = json!({"model": "plain", "messages": [{"role": "user", "content": "Hi"}]});
        let fields = Fields::parse(other.to_string().as_bytes()).unwrap();
        let of_m = |model: &str| (model == "m").then_some(&chat);
        let refused = completion(fields, of_m).unwrap_err();
        assert_eq!(refused.body()["error"]["param"], "messages");

        let strict =
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}";
        let strict = template(dir.path(), json!({"chat_template": strict})).unwrap();
        let fields = Fields::parse(body.to_string().as_bytes()).unwrap();
        let refused = completion(fields, |_| Some(&strict)).unwrap_err();
        assert!(
            refused.body()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("user first")
        );
        assert!(template(dir.path(), json!({"chat_template": "{% if %}"})).is_none());
        assert!(template(dir.path(), json!({"eos_token": "x"})).is_none());
    }
}
