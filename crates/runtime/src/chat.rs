//! Chat templates: the Jinja template a model ships (tokenizer_config.json `chat_template` or GGUF
//! `tokenizer.chat_template`), rendered with minijinja under Hugging Face's conventions:
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`,
//! `trim_blocks`/`lstrip_blocks`, and Python string methods (`.strip()`, `.startswith()`…).

use flywheel_api::ChatMessage;
use minijinja::{context, Environment, ErrorKind};

use crate::{Error, Result};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Today's date (UTC) in a `strftime` format; Llama 3 templates print it as "Today Date".
/// Supports `%d %m %y %Y %b %B %e %%`; other directives are kept verbatim.
fn strftime_now(fmt: String) -> String {
    format_date(flywheel_api::files::unix_secs() / 86_400, &fmt)
}

/// Formats the civil date `days` after 1970-01-01.
fn format_date(days: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (year, month, day) = flywheel_api::files::civil_date(days);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from in errors.
    pub fn new(source: &str, bos_token: &str, eos_token: &str, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::ChatTemplate {
                origin: origin.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the messages; with `add_generation_prompt` the text ends where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders the messages with the tools they may call (OpenAI's `tools` entries, passed to
    /// the template as `tools`, as Hugging Face does). A call's `arguments` reach the template
    /// as a mapping, not as JSON text, so `tojson` prints them once.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                if let Some(calls) = v.get_mut("tool_calls").and_then(|c| c.as_array_mut()) {
                    for c in calls {
                        let args = &mut c["function"]["arguments"];
                        if let Some(parsed) = args
                            .as_str()
                            .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok())
                        {
                            *args = parsed;
                        }
                    }
                }
                v
            })
            .collect();
        let tools = (!tools.is_empty()).then_some(tools);
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::ChatTemplate {
            origin: "render".into(),
            reason: e.to_string(),
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() -> anyhow::Result<()> {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>", "test")?;
        let out = t.render(&[ChatMessage::new("user", "Hi")], true)?;
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "Q"),
            ],
            false,
        )?;
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        );
        Ok(())
    }

    #[test]
    fn python_methods_bos_and_raise_exception_work() -> anyhow::Result<()> {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.content.strip() | upper }}]{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>", "test")?;
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi  ")], false)?,
            "<s>[HI]"
        );
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("bad role tool"), "{err}");
        Ok(())
    }

    #[test]
    fn dates_format_like_strftime() {
        // 2024-07-26 is day 19_930 after the epoch; 2000-02-29 is day 11_016.
        assert_eq!(format_date(19_930, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            format_date(11_016, "%Y-%m-%d (%B, %y) %% %Q"),
            "2000-02-29 (February, 00) % %Q"
        );
        assert_eq!(format_date(0, "%e.%m.%Y"), " 1.01.1970");
        let today = strftime_now("%Y".into());
        assert!(today.parse::<i32>().unwrap() >= 2024, "{today}");
    }

    #[test]
    fn broken_template_is_reported_with_its_origin() {
        let err = ChatTemplate::new("{% for %}", "", "", "tokenizer_config.json")
            .err()
            .unwrap();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }
}
