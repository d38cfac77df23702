//! The Alpaca prompt template exactly as the reference (Unsloth Mistral 7B Alpaca) notebook
//! formats it, with EOS appended: without it the model never learns to stop.

use super::dataset::{field_str, Dataset, Row};
use crate::error::{Error, Result};

/// The notebook's `alpaca_prompt`, verbatim.
pub const ALPACA_TEMPLATE: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}";

/// `alpaca_prompt.format(instruction, input, response)`.
pub fn alpaca_prompt(instruction: &str, input: &str, response: &str) -> String {
    let mut parts = ALPACA_TEMPLATE.split("{}");
    let mut out = String::with_capacity(
        ALPACA_TEMPLATE.len() + instruction.len() + input.len() + response.len(),
    );
    for (part, value) in parts.by_ref().zip([instruction, input, response]) {
        out.push_str(part);
        out.push_str(value);
    }
    out.extend(parts);
    out
}

/// One Alpaca row as (prompt, completion): the prompt ends with "### Response:\n", the
/// completion is the response followed by `eos`. `input` may be missing or empty.
pub fn alpaca_pair(row: &Row, eos: &str) -> std::result::Result<(String, String), String> {
    let instruction = field_str(row, "instruction")?;
    let input = match row.get("input") {
        None | Some(serde_json::Value::Null) => "",
        Some(_) => field_str(row, "input")?,
    };
    let output = field_str(row, "output")?;
    Ok((
        alpaca_prompt(instruction, input, ""),
        format!("{output}{eos}"),
    ))
}

/// The notebook's `formatting_prompts_func`: adds a `text` field (prompt + response + EOS)
/// and the `prompt` / `completion` split used for completion-only loss.
pub fn format_alpaca(dataset: &Dataset, eos: &str) -> Result<Dataset> {
    if dataset.is_empty() {
        return Err(Error::InvalidArgument("the dataset is empty".into()));
    }
    let mut rows = Vec::with_capacity(dataset.len());
    for (i, row) in dataset.rows().iter().enumerate() {
        let (prompt, completion) =
            alpaca_pair(row, eos).map_err(|e| Error::InvalidArgument(format!("row {i}: {e}")))?;
        let mut out = row.clone();
        out.insert("text".into(), format!("{prompt}{completion}").into());
        out.insert("prompt".into(), prompt.into());
        out.insert("completion".into(), completion.into());
        rows.push(out);
    }
    Ok(Dataset::from_rows(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_matches_the_notebook() {
        let p = alpaca_prompt("Continue the fibonacci sequence.", "1, 1, 2, 3, 5, 8", "");
        assert_eq!(
            p,
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nContinue the fibonacci sequence.\n\n### Input:\n1, 1, 2, 3, 5, 8\n\n### Response:\n"
        );
    }

    #[test]
    fn rows_get_text_with_eos_and_missing_fields_are_named() {
        let ds = Dataset::from_rows(vec![
            serde_json::json!({"instruction": "Say hi", "output": "hi"})
                .as_object()
                .unwrap()
                .clone(),
        ]);
        let f = format_alpaca(&ds, "</s>").unwrap();
        let text = f.text(0, "text").unwrap();
        assert!(text.ends_with("### Response:\nhi</s>"), "{text}");
        assert!(
            text.contains("### Input:\n\n"),
            "empty input keeps its section"
        );
        let bad = Dataset::from_rows(vec![serde_json::json!({"instruction": "x"})
            .as_object()
            .unwrap()
            .clone()]);
        let err = format_alpaca(&bad, "</s>").unwrap_err().to_string();
        assert!(err.contains("row 0") && err.contains("output"), "{err}");
    }
}
