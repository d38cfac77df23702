//! A real pretrained model: SmolLM2-135M-Instruct from its Q4_1 GGUF (Llama architecture,
//! GQA, tied embeddings, gpt2 byte-level BPE tokenizer, ChatML template).

use peft_prelude::generate::chat;
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::tokenizer::ChatMessage;
use peft_tests::smollm2_gguf;

#[test]
fn answers_the_capital_of_france_with_paris() {
    let p = Pretrained::from_gguf(smollm2_gguf(), &LoadOptions::default()).unwrap();
    let c = p.model.config();
    assert_eq!((c.num_hidden_layers, c.hidden_size), (30, 576));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (9, 3));
    assert!(c.tie_word_embeddings);

    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let config = p.generation_config.clone().greedy(24);
    let mut streamed = String::new();
    let mut on_text = |t: &str| streamed.push_str(t);
    let out = chat(
        &p.model,
        &p.tokenizer,
        &messages,
        &config,
        Some(&mut on_text),
    )
    .unwrap();
    eprintln!(
        "SmolLM2: {:?} ({:.1} tokens/s)",
        out.text(),
        out.tokens_per_second()
    );
    assert!(out.text().contains("Paris"), "answer: {:?}", out.text());
    assert_eq!(
        streamed,
        out.text(),
        "the streamer saw exactly the returned text"
    );
}
