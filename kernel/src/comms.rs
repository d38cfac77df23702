//! The kernel's side of Jupyter widgets: every comm the cell process opened (a widget model)
//! with its current state. It answers the page (state requests, `echo_update` of the page's
//! own changes, the widget manager's `request_states`), and writes each comm's state into the
//! side-channel folder, where a running cell reads what the page did (a slider moved, a button
//! clicked) without waiting for the cell to end. The kernel knows nothing of what a widget is:
//! it keeps JSON state per comm id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use peft_protocol::{comm_state_path, CommState, KEPT_CUSTOM};
use serde_json::{json, Map, Value};

/// The widget target of ipywidgets' protocol 2, and the one its JupyterLab manager opens to
/// restore the state of every live widget after a page reload.
pub const WIDGET_TARGET: &str = "jupyter.widget";
pub const CONTROL_TARGET: &str = "jupyter.widget.control";

/// A Jupyter message to send on iopub.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub msg_type: &'static str,
    pub content: Value,
    /// The message's metadata (a widget's `comm_open` carries the protocol version here).
    pub metadata: Value,
}

fn reply(msg_type: &'static str, content: Value) -> Reply {
    Reply {
        msg_type,
        content,
        metadata: json!({}),
    }
}

#[derive(Debug)]
struct Entry {
    target: String,
    state: CommState,
}

/// Open comms and their state, shared by the server loops and the output forwarder.
#[derive(Debug)]
pub struct Comms {
    dir: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Comms the page opened to `jupyter.widget.control`.
    control: Mutex<Vec<String>>,
}

impl Comms {
    /// A registry writing into `dir` (created; state files of an earlier kernel removed).
    pub fn new(dir: &Path) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("peft-kernel: cannot create {}: {e}", dir.display());
        }
        Comms {
            dir: dir.to_path_buf(),
            entries: Mutex::new(BTreeMap::new()),
            control: Mutex::new(vec![]),
        }
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cell opened a comm: remember its state. Returns the `comm_open` to send.
    pub fn opened_by_cell(
        &self,
        comm_id: &str,
        target: &str,
        data: &Value,
        metadata: &Value,
    ) -> Reply {
        let state = CommState {
            version: 1,
            state: data["state"].as_object().cloned().unwrap_or_default(),
            ..Default::default()
        };
        self.write(comm_id, &state);
        self.entries.lock().unwrap().insert(
            comm_id.to_string(),
            Entry {
                target: target.to_string(),
                state,
            },
        );
        Reply {
            msg_type: "comm_open",
            content: json!({ "comm_id": comm_id, "target_name": target, "data": data }),
            metadata: metadata.clone(),
        }
    }

    /// A message the cell sent on its comm: an `update` is merged into the state. Returns
    /// the `comm_msg` to send.
    pub fn cell_msg(&self, comm_id: &str, data: &Value, seq: u64) -> Reply {
        if data["method"] == "update" {
            self.merge(comm_id, &data["state"], Some(seq));
        }
        reply("comm_msg", json!({ "comm_id": comm_id, "data": data }))
    }

    /// The cell closed its comm. Returns the `comm_close` to send.
    pub fn closed_by_cell(&self, comm_id: &str) -> Reply {
        self.forget(comm_id);
        reply("comm_close", json!({ "comm_id": comm_id, "data": {} }))
    }

    /// What to send for a comm record of the cell's; `None` for other records.
    pub fn relay_cell_record(&self, record: &peft_protocol::Record) -> Option<Reply> {
        use peft_protocol::Record;
        match record {
            Record::CommOpen {
                comm_id,
                target_name,
                data,
                metadata,
            } => Some(self.opened_by_cell(comm_id, target_name, data, metadata)),
            Record::CommMsg { comm_id, data, seq } => Some(self.cell_msg(comm_id, data, *seq)),
            Record::CommClose { comm_id } => Some(self.closed_by_cell(comm_id)),
            _ => None,
        }
    }

    /// A `comm_msg` from the page; returns the replies (children of that message).
    pub fn page_msg(&self, comm_id: &str, data: &Value) -> Vec<Reply> {
        if self.control.lock().unwrap().iter().any(|c| c == comm_id) {
            return match data["method"].as_str() {
                Some("request_states") => vec![reply(
                    "comm_msg",
                    json!({
                        "comm_id": comm_id,
                        "data": { "method": "update_states", "states": self.states(), "buffer_paths": {} },
                    }),
                )],
                _ => vec![],
            };
        }
        match data["method"].as_str() {
            Some("update") => {
                self.merge(comm_id, &data["state"], None);
                // Protocol 2.1: echo the page's change to every page (the sender waits for
                // its own echo before applying later echoes).
                vec![reply(
                    "comm_msg",
                    json!({
                        "comm_id": comm_id,
                        "data": { "method": "echo_update", "state": data["state"], "buffer_paths": [] },
                    }),
                )]
            }
            Some("request_state") => {
                let state = self
                    .entries
                    .lock()
                    .unwrap()
                    .get(comm_id)
                    .map(|e| Value::Object(e.state.state.clone()));
                match state {
                    Some(state) => vec![reply(
                        "comm_msg",
                        json!({
                            "comm_id": comm_id,
                            "data": { "method": "update", "state": state, "buffer_paths": [] },
                        }),
                    )],
                    None => vec![],
                }
            }
            Some("custom") => {
                let mut entries = self.entries.lock().unwrap();
                if let Some(e) = entries.get_mut(comm_id) {
                    e.state.custom_count += 1;
                    e.state.custom.push(data["content"].clone());
                    let excess = e.state.custom.len().saturating_sub(KEPT_CUSTOM);
                    e.state.custom.drain(..excess);
                    e.state.version += 1;
                    self.write(comm_id, &e.state);
                }
                vec![]
            }
            _ => vec![],
        }
    }

    /// A `comm_open` from the page: the widget manager's control comm is kept; a widget the
    /// page creates on its own is refused (closed), as the cell would never see it.
    pub fn page_open(&self, comm_id: &str, target: &str) -> Vec<Reply> {
        if target == CONTROL_TARGET {
            self.control.lock().unwrap().push(comm_id.to_string());
            return vec![];
        }
        vec![reply(
            "comm_close",
            json!({ "comm_id": comm_id, "data": {} }),
        )]
    }

    /// The page closed a comm.
    pub fn page_close(&self, comm_id: &str) {
        self.control.lock().unwrap().retain(|c| c != comm_id);
        self.forget(comm_id);
    }

    /// `comm_info_reply` content: the open comms, of `target` when given.
    pub fn info(&self, target: Option<&str>) -> Value {
        let comms: Map<String, Value> = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| target.is_none_or(|t| t == e.target))
            .map(|(id, e)| (id.clone(), json!({ "target_name": e.target })))
            .collect();
        json!({ "status": "ok", "comms": comms })
    }

    /// Every live widget model as a notebook saves it
    /// (`metadata.widgets["application/vnd.jupyter.widget-state+json"]`), `None` without any.
    pub fn notebook_widget_state(&self) -> Option<Value> {
        let states = self.states();
        if states.as_object().is_none_or(|s| s.is_empty()) {
            return None;
        }
        Some(json!({ "version_major": 2, "version_minor": 0, "state": states }))
    }

    /// `{comm_id: {model_name, model_module, model_module_version, state}}` of the widgets.
    fn states(&self) -> Value {
        let states: Map<String, Value> = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.target == WIDGET_TARGET)
            .map(|(id, e)| {
                let s = &e.state.state;
                (
                    id.clone(),
                    json!({
                        "model_name": s.get("_model_name"),
                        "model_module": s.get("_model_module"),
                        "model_module_version": s.get("_model_module_version"),
                        "state": s,
                    }),
                )
            })
            .collect();
        Value::Object(states)
    }

    /// Merges an update into a comm's state (`cell_seq`: the cell's sequence number, for its
    /// own updates).
    fn merge(&self, comm_id: &str, update: &Value, cell_seq: Option<u64>) {
        let mut entries = self.entries.lock().unwrap();
        let (Some(e), Some(update)) = (entries.get_mut(comm_id), update.as_object()) else {
            return;
        };
        for (k, v) in update {
            e.state.state.insert(k.clone(), v.clone());
        }
        if let Some(seq) = cell_seq {
            e.state.cell_seq = e.state.cell_seq.max(seq);
        }
        e.state.version += 1;
        self.write(comm_id, &e.state);
    }

    fn forget(&self, comm_id: &str) {
        self.entries.lock().unwrap().remove(comm_id);
        let _ = std::fs::remove_file(comm_state_path(&self.dir, comm_id));
    }

    /// Writes beside the final name and renames, so the cell never reads half a state.
    fn write(&self, comm_id: &str, state: &CommState) {
        let path = comm_state_path(&self.dir, comm_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(state).expect("comm state serialises");
        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)) {
            eprintln!("peft-kernel: cannot write {}: {e}", path.display());
        }
    }

    /// Whether a background run of the cell process is training (its marker file exists).
    pub fn runs_active(&self) -> bool {
        std::fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| peft_protocol::is_run_marker(&e.file_name().to_string_lossy()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(comms: &Comms, id: &str) -> CommState {
        serde_json::from_slice(&std::fs::read(comm_state_path(comms.dir(), id)).unwrap()).unwrap()
    }

    #[test]
    fn state_flows_both_ways_through_the_side_channel() {
        let dir = std::env::temp_dir().join(format!("peft-comms-{}", std::process::id()));
        let comms = Comms::new(&dir);
        let data =
            json!({"state": {"_model_name": "FloatSliderModel", "value": 0.1}, "buffer_paths": []});
        let open = comms.opened_by_cell("w1", WIDGET_TARGET, &data, &json!({"version": "2.1.0"}));
        assert_eq!(open.msg_type, "comm_open");
        assert_eq!(open.content["data"]["state"]["value"], 0.1);
        assert_eq!(open.metadata["version"], "2.1.0");
        assert_eq!(read(&comms, "w1").state["value"], 0.1);
        // The page moves the slider: merged, written, echoed.
        let replies = comms.page_msg("w1", &json!({"method": "update", "state": {"value": 0.5}}));
        assert_eq!(replies[0].content["data"]["method"], "echo_update");
        let s = read(&comms, "w1");
        assert_eq!((s.state["value"].clone(), s.version), (json!(0.5), 2));
        // A click.
        comms.page_msg(
            "w1",
            &json!({"method": "custom", "content": {"event": "click"}}),
        );
        let s = read(&comms, "w1");
        assert_eq!(
            (s.custom_count, s.custom[0]["event"].clone()),
            (1, json!("click"))
        );
        // The cell sets it; the page asks for the state; the manager restores everything.
        comms.cell_msg(
            "w1",
            &json!({"method": "update", "state": {"value": 0.7}}),
            3,
        );
        assert_eq!(read(&comms, "w1").cell_seq, 3);
        let r = comms.page_msg("w1", &json!({"method": "request_state"}));
        assert_eq!(r[0].content["data"]["state"]["value"], 0.7);
        comms.page_open("c1", CONTROL_TARGET);
        let r = comms.page_msg("c1", &json!({"method": "request_states"}));
        assert_eq!(
            r[0].content["data"]["states"]["w1"]["model_name"],
            "FloatSliderModel"
        );
        assert_eq!(
            comms.info(Some(WIDGET_TARGET))["comms"]["w1"]["target_name"],
            WIDGET_TARGET
        );
        assert!(comms.notebook_widget_state().is_some());
        comms.closed_by_cell("w1");
        assert!(!comm_state_path(&dir, "w1").exists());
        assert!(comms.notebook_widget_state().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
