//! From rows to token ids and labels: plain text, prompt/completion pairs (with the prompt
//! masked for completion-only loss) or chat messages through the model's chat template;
//! truncated to `max_seq_length`.

use serde_json::Value;

use super::dataset::{field_str, Dataset, Row};
use crate::error::{Error, Result};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::train::IGNORE_INDEX;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] where no loss is taken.
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens that count in the loss (labels shifted by one, as the loss uses them).
    pub fn num_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    pub max_seq_length: usize,
    /// Loss on the completion only (rows with `prompt`/`completion` or `messages`).
    pub completion_only_loss: bool,
    /// The field holding plain text when a row has no prompt/completion or messages.
    pub text_field: String,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            max_seq_length: 1024,
            completion_only_loss: true,
            text_field: "text".into(),
        }
    }
}

/// Tokenizes every row. Row kinds, in order of preference: `prompt` + `completion`,
/// `messages` (chat template; loss on the last assistant turn when completion-only), the
/// text field. A row that has none of them is an error naming the row and its fields.
pub fn tokenize_dataset(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
    options: &TokenizeOptions,
) -> Result<Vec<Example>> {
    if dataset.is_empty() {
        return Err(Error::InvalidArgument(
            "the dataset is empty: nothing to train on".into(),
        ));
    }
    if options.max_seq_length < 2 {
        return Err(Error::InvalidArgument(
            "max_seq_length must be at least 2".into(),
        ));
    }
    dataset
        .rows()
        .iter()
        .enumerate()
        .map(|(i, row)| {
            tokenize_row(row, tokenizer, options).map_err(|e| match e {
                Error::InvalidArgument(m) => Error::InvalidArgument(format!("row {i}: {m}")),
                other => other,
            })
        })
        .collect()
}

fn tokenize_row(row: &Row, tokenizer: &Tokenizer, options: &TokenizeOptions) -> Result<Example> {
    let invalid = Error::InvalidArgument;
    let (prompt, full, special) = if row.contains_key("prompt") && row.contains_key("completion") {
        let prompt = field_str(row, "prompt").map_err(invalid)?;
        let completion = field_str(row, "completion").map_err(invalid)?;
        (
            Some(prompt.to_string()),
            format!("{prompt}{completion}"),
            true,
        )
    } else if let Some(messages) = row.get("messages") {
        let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).map_err(|e| {
            invalid(format!(
                "`messages` is not a list of {{role, content}}: {e}"
            ))
        })?;
        let Some(last) = messages.last() else {
            return Err(invalid("`messages` is empty".into()));
        };
        let full = tokenizer.apply_chat_template(&messages, false)?;
        let prompt = if last.role == "assistant" {
            Some(tokenizer.apply_chat_template(&messages[..messages.len() - 1], true)?)
        } else {
            None
        };
        // Chat templates write BOS themselves.
        (prompt, full, false)
    } else {
        match row.get(&options.text_field) {
            Some(Value::String(s)) => (None, s.clone(), true),
            _ => {
                return Err(invalid(format!(
                    "no `prompt`/`completion`, `messages` or `{}` field (the row has: {})",
                    options.text_field,
                    row.keys().cloned().collect::<Vec<_>>().join(", ")
                )))
            }
        }
    };
    let mut ids = tokenizer.encode(&full, special)?;
    if ids.is_empty() {
        return Err(invalid("the text tokenizes to nothing".into()));
    }
    ids.truncate(options.max_seq_length);
    let masked = match (&prompt, options.completion_only_loss) {
        (Some(p), true) => tokenizer.encode(p, special)?.len().min(ids.len()),
        _ => 0,
    };
    let labels = ids
        .iter()
        .enumerate()
        .map(|(t, &id)| if t < masked { IGNORE_INDEX } else { id as i64 })
        .collect();
    Ok(Example {
        input_ids: ids,
        labels,
    })
}
