//! `use peft_prelude::prelude::*;` — everything a notebook cell needs, in one import.

pub use crate::data::{alpaca_prompt, format_alpaca, Dataset, Row, TokenizeOptions};
pub use crate::error::{Error, Result};
pub use crate::generate::{
    chat, completion_logprob, generate, generate_batch, generate_ids, FinishReason, Generation,
    GenerationConfig, Hooks, StdoutStreamer, Streamer,
};
pub use crate::model::{
    CausalLm, Forward, FrozenLinear, KvCache, Linear, LoadOptions, Model, ModelConfig, Pretrained,
};
pub use crate::notebook::widgets::{
    Button, Checkbox, Dropdown, FloatLogSlider, FloatSlider, HBox, HtmlWidget, IntSlider, Label,
    Progress, Text, ToggleButtons, VBox, Widget,
};
/// Every `Debug` value shows as the last expression of a cell in one build (see the trait).
pub use crate::notebook::DebugDisplay as _;
pub use crate::notebook::{
    clear_output, interrupted, print_stream, show, show_text, Display, Figure, Html, LinePlot, Png,
    ProgressBar, Rich, Svg, Table, TokenStreamer,
};
pub use crate::peft::{
    get_peft_model, BottleneckConfig, Ia3Config, LoraConfig, LoraInit, PeftConfig, PeftModel,
    PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TargetModules,
};
pub use crate::quant::Quantization;
pub use crate::setup::{best_device, example_data, has_cuda, models_dir, smollm2};
pub use crate::tokenizer::{ChatMessage, Tokenizer};
pub use crate::train::{
    plot_runs, DpoConfig, DpoLossType, DpoTrainer, RunHistory, SchedulerType, SftTrainer,
    TrainOutput, TrainingArgs,
};
pub use candle_core::{DType, Device, Tensor, Var, D};
/// Charts of one's own: `use plotters::prelude::*;` in a cell, then draw on a [`Figure`].
pub use plotters;
