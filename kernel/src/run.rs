//! `peft-kernel run NOTEBOOK.ipynb`: executes a notebook headlessly in the same engine as the
//! Jupyter kernel and writes the outputs into it (nbformat 4).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::comms::Comms;
use crate::engine::{prelude_path, Engine};
use crate::errors::{describe, CellError};
use crate::interrupt::InterruptFile;
use crate::messages::{mime_json, output_content};
use crate::output::{Forwarder, MimeData, Out, Sink};
use crate::slot::Slot;

/// The outputs of every cell, and where each display id was shown.
#[derive(Default)]
struct Outputs {
    cell: usize,
    cells: HashMap<usize, Vec<Value>>,
    displays: HashMap<String, Vec<(usize, usize)>>,
}

impl Outputs {
    fn push(&mut self, output: Value) -> usize {
        let outputs = self.cells.entry(self.cell).or_default();
        // nbformat keeps consecutive text of one stream as one output.
        if let (Some(last), Some("stream")) = (outputs.last_mut(), output["output_type"].as_str()) {
            if last["output_type"] == "stream" && last["name"] == output["name"] {
                let text = last["text"].as_str().unwrap_or("").to_string()
                    + output["text"].as_str().unwrap_or("");
                last["text"] = json!(text);
                return outputs.len() - 1;
            }
        }
        outputs.push(output);
        outputs.len() - 1
    }
}

struct NotebookSink(Arc<Mutex<Outputs>>, Arc<Comms>);

impl Sink for NotebookSink {
    fn emit(&mut self, out: Out) {
        if let Out::Comm(record) = &out {
            // Kept for the notebook's widget state; nobody is listening.
            self.1.relay_cell_record(record);
            return;
        }
        let mut o = self.0.lock().unwrap();
        let (msg_type, content) = output_content(&out);
        match out {
            Out::Stream { .. } => {
                o.push(json!({ "output_type": "stream", "name": content["name"], "text": content["text"] }));
            }
            Out::Display { id, .. } => {
                let index = o.push(json!({
                    "output_type": msg_type, "data": content["data"], "metadata": {}
                }));
                if let Some(id) = id {
                    let cell = o.cell;
                    o.displays.entry(id).or_default().push((cell, index));
                }
            }
            Out::Update { id, .. } => {
                let places = o.displays.get(&id).cloned().unwrap_or_default();
                for (cell, index) in places {
                    if let Some(output) = o.cells.get_mut(&cell).and_then(|c| c.get_mut(index)) {
                        output["data"] = content["data"].clone();
                    }
                }
            }
            Out::Clear { .. } => {
                let cell = o.cell;
                o.cells.remove(&cell);
            }
            Out::Comm(_) => unreachable!("handled above"),
        }
    }
}

/// Runs every code cell of `input`, writes the executed notebook to `output`, and fails on the
/// first cell error unless `allow_errors`.
pub fn run(input: &Path, output: &Path, slot: &Slot, allow_errors: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut notebook: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
    let outputs = Arc::new(Mutex::new(Outputs::default()));
    let comms = Arc::new(Comms::new(&slot.state_dir()));
    let mut forwarder = None;
    let start = Instant::now();
    if !slot.is_warm() {
        eprintln!(
            "peft-kernel run: compiling candle and the prelude into {} (the first time only: several minutes)",
            slot.dir.display()
        );
    }
    let mut engine = Engine::start(slot, &prelude_path(), |o| {
        forwarder = Some(Forwarder::spawn(
            o.stdout,
            o.stderr,
            NotebookSink(Arc::clone(&outputs), Arc::clone(&comms)),
        ));
    })?;
    let forwarder = forwarder.context("evcxr produced no output channels")?;
    eprintln!(
        "peft-kernel run: prelude ready after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let interrupt = InterruptFile::new(&slot.interrupt_file());

    let cells = notebook["cells"]
        .as_array()
        .context("the notebook has no cells")?
        .clone();
    let code_cells = cells.iter().filter(|c| c["cell_type"] == "code").count();
    let mut count = 0;
    let mut failure = None;
    for (i, cell) in cells.iter().enumerate() {
        if cell["cell_type"] != "code" {
            continue;
        }
        count += 1;
        let source = match &cell["source"] {
            Value::Array(lines) => lines.iter().filter_map(Value::as_str).collect::<String>(),
            Value::String(s) => s.clone(),
            _ => String::new(),
        };
        outputs.lock().unwrap().cell = i;
        interrupt.reset();
        let t = Instant::now();
        let result = engine.ctx.execute(&source);
        let report = forwarder.finish_cell();
        let error = match result {
            Ok(out) => match report.panic {
                Some(message) => Some(CellError::new("panic", &message)),
                None => {
                    if !out.is_empty() {
                        let data: MimeData = out.content_by_mime_type.into_iter().collect();
                        outputs.lock().unwrap().push(json!({
                            "output_type": "execute_result", "execution_count": count,
                            "data": mime_json(&data), "metadata": {}
                        }));
                    }
                    None
                }
            },
            Err(e) => Some(describe(&e)),
        };
        let state = if error.is_some() { "error" } else { "ok" };
        eprintln!(
            "peft-kernel run: cell {count}/{code_cells} {state} ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        if let Some(e) = &error {
            outputs.lock().unwrap().push(json!({
                "output_type": "error", "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback
            }));
        }
        let cell_outputs = outputs
            .lock()
            .unwrap()
            .cells
            .get(&i)
            .cloned()
            .unwrap_or_default();
        notebook["cells"][i]["outputs"] = json!(cell_outputs);
        notebook["cells"][i]["execution_count"] = json!(count);
        if let Some(e) = error {
            eprintln!("{}", e.traceback.join("\n"));
            if !allow_errors {
                failure = Some(format!("cell {count} failed: {}", e.evalue));
                break;
            }
        }
    }
    // Updates may have changed outputs of earlier cells: write them all again.
    let o = outputs.lock().unwrap();
    for (i, cell_outputs) in &o.cells {
        notebook["cells"][*i]["outputs"] = json!(cell_outputs);
    }
    // Live widgets' state, as ipywidgets saves it: the saved notebook shows the widgets.
    if let Some(state) = comms.notebook_widget_state() {
        notebook["metadata"]["widgets"] =
            json!({ "application/vnd.jupyter.widget-state+json": state });
    }
    std::fs::write(output, serde_json::to_string_pretty(&notebook)? + "\n")
        .with_context(|| format!("writing {}", output.display()))?;
    if let Some(f) = failure {
        bail!("{f} (outputs written to {})", output.display());
    }
    Ok(())
}
