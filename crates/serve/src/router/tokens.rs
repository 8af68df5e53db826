//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes): a prompt or chat messages to the
//! token ids the model would see, and ids back to text.

use super::*;
use serde::Deserialize;

/// `POST /tokenize`: a plain prompt, or chat messages rendered with the model's template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<openai::Message>>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    model: String,
    tokens: Vec<u32>,
}

pub(super) async fn tokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let res = (|| {
        let body = body_bytes(body, st.max_body_bytes)?;
        let b: TokenizeBody = openai::parse(&body)?;
        st.resolve(&b.model)?;
        let ids = match (b.prompt, b.messages) {
            (Some(p), None) => st
                .model
                .encode_prompt(&p)
                .map_err(|e| bad("prompt", e.to_string()))?,
            (None, Some(m)) => {
                let msgs = completions::chat_messages(m)?;
                st.model
                    .render_chat(&msgs)
                    .and_then(|p| st.model.encode_prompt(&p))
                    .map_err(|e| bad("messages", e.to_string()))?
            }
            _ => {
                return Err(bad(
                    "prompt",
                    "give either `prompt` (text) or `messages` (a chat), not both".into(),
                ))
            }
        };
        Ok::<_, ServeError>(json!({
            "count": ids.len(),
            "max_model_len": st.model.model().config().max_position_embeddings,
            "tokens": ids,
        }))
    })();
    match res {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn detokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let res = (|| {
        let body = body_bytes(body, st.max_body_bytes)?;
        let b: DetokenizeBody = openai::parse(&body)?;
        st.resolve(&b.model)?;
        let vocab = st.model.tokenizer().vocab_size();
        if let Some(i) = b.tokens.iter().position(|&t| t as usize >= vocab) {
            return Err(bad(
                &format!("tokens[{i}]"),
                format!(
                    "{} is not a token id (the vocabulary has {vocab})",
                    b.tokens[i]
                ),
            ));
        }
        let text = st
            .model
            .tokenizer()
            .decode(&b.tokens, false)
            .map_err(|e| bad("tokens", e.to_string()))?;
        Ok::<_, ServeError>(json!({ "prompt": text }))
    })();
    match res {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
