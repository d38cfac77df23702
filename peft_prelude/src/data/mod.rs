//! Datasets, the Alpaca template, tokenization with loss masks, padding and packing.

pub mod alpaca;
pub mod collate;
pub mod dataset;
pub mod parquet;
pub mod tokenize;

pub use alpaca::{alpaca_prompt, format_alpaca, ALPACA_TEMPLATE};
pub use collate::{pack_examples, packed_batch, pad_batch, Batch, PackedRow};
pub use dataset::{Dataset, Row};
pub use tokenize::{tokenize_dataset, Example, TokenizeOptions};
