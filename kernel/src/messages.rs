//! Building Jupyter messages from JSON content (the protocol crate's typed structs are used
//! for parsing; building from JSON keeps arbitrary mime bundles and extra fields intact).

use jupyter_protocol::{JupyterMessage, JupyterMessageContent, UnknownMessage};
use serde_json::{json, Value};

use crate::output::{MimeData, Out};

/// A message of `msg_type` with `content`, as a child of `parent`.
pub fn child(parent: &JupyterMessage, msg_type: &str, content: Value) -> JupyterMessage {
    let content = JupyterMessageContent::from_type_and_content(msg_type, content.clone())
        .unwrap_or_else(|_| {
            JupyterMessageContent::UnknownMessage(UnknownMessage {
                msg_type: msg_type.to_string(),
                content,
            })
        });
    JupyterMessage::new(content, Some(parent))
}

/// A comm reply (see `comms::Reply`) as a child of `parent`.
pub fn comm_message(parent: &JupyterMessage, reply: crate::comms::Reply) -> JupyterMessage {
    let mut msg = child(parent, reply.msg_type, reply.content);
    msg.metadata = reply.metadata;
    msg
}

pub fn status(parent: &JupyterMessage, state: &str) -> JupyterMessage {
    child(parent, "status", json!({ "execution_state": state }))
}

/// Mime data as Jupyter JSON (JSON mime types carry parsed JSON, everything else strings).
pub fn mime_json(data: &MimeData) -> Value {
    let map = data
        .iter()
        .map(|(mime, content)| {
            let value = if mime.ends_with("json") {
                serde_json::from_str(content).unwrap_or_else(|_| json!(content))
            } else {
                json!(content)
            };
            (mime.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>();
    Value::Object(map)
}

/// An output as (iopub message type, content).
pub fn output_content(out: &Out) -> (&'static str, Value) {
    match out {
        Out::Stream { name, text } => ("stream", json!({ "name": name, "text": text })),
        Out::Display { id, data } => {
            let transient = match id {
                Some(id) => json!({ "display_id": id }),
                None => json!({}),
            };
            (
                "display_data",
                json!({ "data": mime_json(data), "metadata": {}, "transient": transient }),
            )
        }
        Out::Update { id, data } => (
            "update_display_data",
            json!({ "data": mime_json(data), "metadata": {}, "transient": { "display_id": id } }),
        ),
        Out::Clear { wait } => ("clear_output", json!({ "wait": wait })),
        // Comm records go through `comms::Comms`, which keeps their state.
        Out::Comm(record) => ("comm_msg", json!({ "record": record })),
    }
}
