//! Live notebook output (display handles, progress bars, plots, token streaming) and the
//! cooperative interrupt check. Outside the kernel everything falls back to plain text.
