//! Live notebook output (display handles, progress bars, plots, token streaming) and the
//! cooperative interrupt check. Outside the kernel everything falls back to plain text.
//!
//! Inside the `peft-kernel` Jupyter kernel (which sets [`protocol::ENV_KERNEL`] for the
//! process that runs cells) every function here writes one-line records to stdout
//! ([`protocol::Record`]): the kernel turns them into `display_data`, `update_display_data`,
//! `stream` and `clear_output` messages. Elsewhere (tests, scripts, a plain REPL) the same
//! calls print text, so code written for a notebook runs anywhere.
//!
//! Nothing here keeps global state across calls that matters for correctness: evcxr links
//! each cell into its own library, so every cell sees its own copy of any `static`.

mod display;
pub mod figure;
mod interrupt;
mod plot;
mod progress;
pub mod protocol;
mod stream;
pub mod widgets;

pub(crate) use display::escape_html;
pub use display::{
    show, show_text, DebugDisplay, Display, Html, MimeBundle, Png, Rich, Svg, Table,
};
pub use figure::Figure;
pub use interrupt::{interrupt_count, interrupted};
pub use plot::LinePlot;
pub use progress::ProgressBar;
pub use protocol::{in_kernel, mark_background_thread};
pub use stream::{clear_output, print_stream, TokenStreamer};
