//! Jupyter widgets from Rust: the controls of ipywidgets 8 (protocol 2.1, models of
//! `@jupyter-widgets/controls` 2.0.0), rendered by JupyterLab's stock widget extension.
//!
//! ```no_run
//! use peft_prelude::notebook::widgets::{Button, FloatLogSlider};
//! use peft_prelude::notebook::show;
//!
//! let lr = FloatLogSlider::new("learning rate", 2e-4, (1e-6, 1e-2));
//! let stop = Button::new("stop");
//! show(&lr);
//! show(&stop);
//! // In a loop that runs for minutes, the page's changes arrive between iterations:
//! while stop.clicks() == 0 {
//!     let _rate = lr.value();
//! #   break;
//! }
//! ```
//!
//! A widget is a comm the cell opens ([`peft_protocol::Record::CommOpen`]); the kernel relays
//! it to the page and writes what the page does to it into a small file per widget, which
//! [`Widget::get`] reads: so a value moved in the page reaches a cell that is still running
//! (a training loop reads a slider between steps). Setting a value from Rust updates the page.
//! Outside the kernel widgets keep their values in memory and nothing is shown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use peft_protocol::{comm_state_path, CommState, Record, ENV_STATE_DIR};
use serde_json::{json, Map, Value};

use super::display::{evcxr_print, MimeBundle, Rich};
use super::protocol::{emit, in_kernel, new_display_id};
use crate::sync::lock;

const CONTROLS: &str = "@jupyter-widgets/controls";
const BASE: &str = "@jupyter-widgets/base";
const MODULE_VERSION: &str = "2.0.0";
/// The widget message protocol spoken (ipywidgets 8).
const PROTOCOL_VERSION: &str = "2.1.0";

/// Which ipywidgets model a widget is: its kind (for text), model and view names, and the
/// style model it takes.
struct ModelKind {
    kind: &'static str,
    model: &'static str,
    view: &'static str,
    style: Option<&'static str>,
}

/// One widget model (a comm), shared by the clones of its handle.
#[derive(Debug)]
struct Model {
    comm_id: String,
    /// The style model's comm, for the kinds that have one.
    style_id: Option<String>,
    state: Mutex<Local>,
}

/// The cell's view of a model's state.
#[derive(Debug, Default)]
struct Local {
    state: Map<String, Value>,
    /// The side file's version last merged.
    version: u64,
    /// Keys set here, with the `seq` of the message that sent them: the file's value of such
    /// a key is older until the kernel has merged that message.
    dirty: HashMap<String, u64>,
    /// The page's custom messages (button clicks): how many the kernel has recorded, and how
    /// many [`Widget::take_custom`] has handed out.
    custom_total: u64,
    custom_seen: u64,
}

/// A widget of any kind: typed widgets ([`FloatSlider`], [`Button`] …) dereference to it.
#[derive(Debug, Clone)]
pub struct Widget {
    model: Arc<Model>,
    kind: &'static str,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Widget {
    /// Opens a model of `_model_name` `model` (`_view_name` `view`) with a layout, and a style
    /// model of `style` when given, then `state` on top of the names.
    fn open(
        ModelKind {
            kind,
            model,
            view,
            style,
        }: ModelKind,
        state: Value,
    ) -> Self {
        let layout = open_comm(json!({
            "_model_module": BASE, "_model_module_version": MODULE_VERSION,
            "_model_name": "LayoutModel",
            "_view_module": BASE, "_view_module_version": MODULE_VERSION,
            "_view_name": "LayoutView",
        }));
        let mut full = json!({
            "_model_module": CONTROLS, "_model_module_version": MODULE_VERSION,
            "_model_name": model,
            "_view_module": CONTROLS, "_view_module_version": MODULE_VERSION,
            "_view_name": view,
            "_dom_classes": [],
            "layout": reference(&layout),
        });
        let mut style_id = None;
        if let Some(style) = style {
            let style = open_comm(json!({
                "_model_module": CONTROLS, "_model_module_version": MODULE_VERSION,
                "_model_name": style,
                "_view_module": BASE, "_view_module_version": MODULE_VERSION,
                "_view_name": "StyleView",
                "description_width": "",
            }));
            full["style"] = json!(reference(&style));
            style_id = Some(style);
        }
        if let (Some(full), Some(extra)) = (full.as_object_mut(), state.as_object()) {
            for (k, v) in extra {
                full.insert(k.clone(), v.clone());
            }
        }
        let comm_id = open_comm(full.clone());
        Widget {
            model: Arc::new(Model {
                comm_id,
                style_id,
                state: Mutex::new(Local {
                    state: full.as_object().cloned().unwrap_or_default(),
                    ..Default::default()
                }),
            }),
            kind,
        }
    }

    /// The model's id (its comm id, `IPY_MODEL_<id>` in references).
    pub fn model_id(&self) -> &str {
        &self.model.comm_id
    }

    /// A state field as the page last left it (or as set here, if that is newer).
    pub fn get(&self, key: &str) -> Value {
        let local = self.sync();
        local.state.get(key).cloned().unwrap_or(Value::Null)
    }

    /// Sets state fields here and in the page.
    pub fn set(&self, fields: Value) {
        let Some(fields) = fields.as_object() else {
            return;
        };
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut local = lock(&self.model.state);
            for (k, v) in fields {
                local.state.insert(k.clone(), v.clone());
                local.dirty.insert(k.clone(), seq);
            }
        }
        send_update(&self.model.comm_id, fields, seq);
    }

    /// Greys the control out in the page (it no longer takes input), or enables it again.
    pub fn set_disabled(&self, disabled: bool) {
        self.set(json!({ "disabled": disabled }));
    }

    /// The width of the description in front of the control: `"initial"` fits the text, a
    /// CSS length (`"120px"`) lines up a column; the default (`""`) is the page's fixed width,
    /// which cuts a long description short. Kinds without a style model ignore it.
    pub fn set_description_width(&self, width: &str) {
        let Some(style_id) = &self.model.style_id else {
            return;
        };
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
        send_update(style_id, &json!({ "description_width": width }), seq);
    }

    /// Custom messages the page has sent (a button's clicks).
    fn custom_total(&self) -> u64 {
        self.sync().custom_total
    }

    /// Custom messages the page sent since the last call.
    fn take_custom(&self) -> u64 {
        let mut local = self.sync();
        let new = local.custom_total.saturating_sub(local.custom_seen);
        local.custom_seen = local.custom_total;
        new
    }

    /// Merges what the kernel wrote since the last read.
    fn sync(&self) -> std::sync::MutexGuard<'_, Local> {
        let mut local = lock(&self.model.state);
        if let Some(file) = read_comm_state(&self.model.comm_id) {
            local.custom_total = local.custom_total.max(file.custom_count);
            if file.version > local.version {
                local.version = file.version;
                for (k, v) in file.state {
                    let newer_here = local.dirty.get(&k).is_some_and(|&s| s > file.cell_seq);
                    if !newer_here {
                        local.dirty.remove(&k);
                        local.state.insert(k, v);
                    }
                }
            }
        }
        local
    }

    /// Closes the model: the page removes its views.
    pub fn close(&self) {
        if in_kernel() {
            emit(&Record::CommClose {
                comm_id: self.model.comm_id.clone(),
            });
        }
    }

    /// Called by evcxr when the widget is the last expression of a cell.
    pub fn evcxr_display(&self) {
        evcxr_print(&self.mime_bundle());
    }
}

impl Rich for Widget {
    fn mime_bundle(&self) -> MimeBundle {
        let view = json!({
            "model_id": self.model.comm_id, "version_major": 2, "version_minor": 0,
        });
        let label = match self.get("description") {
            Value::String(d) if !d.is_empty() => format!("{}({d})", self.kind),
            _ => self.kind.to_string(),
        };
        MimeBundle::from([
            (
                "application/vnd.jupyter.widget-view+json".to_string(),
                view.to_string(),
            ),
            ("text/plain".to_string(), label),
        ])
    }
}

fn reference(comm_id: &str) -> String {
    format!("IPY_MODEL_{comm_id}")
}

/// Opens a `jupyter.widget` comm with `state`; returns its id.
fn open_comm(state: Value) -> String {
    let comm_id = new_display_id().replace("peft-", "w-");
    if in_kernel() {
        emit(&Record::CommOpen {
            comm_id: comm_id.clone(),
            target_name: "jupyter.widget".into(),
            data: json!({ "state": state, "buffer_paths": [] }),
            metadata: json!({ "version": PROTOCOL_VERSION }),
        });
    }
    comm_id
}

fn state_dir() -> Option<std::path::PathBuf> {
    std::env::var_os(ENV_STATE_DIR).map(std::path::PathBuf::from)
}

fn read_comm_state(comm_id: &str) -> Option<CommState> {
    let path = comm_state_path(&state_dir()?, comm_id);
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Sends `fields` of the model `comm_id` to the page (`seq` orders them against the page's).
fn send_update(comm_id: &str, fields: &impl serde::Serialize, seq: u64) {
    if in_kernel() {
        emit(&Record::CommMsg {
            comm_id: comm_id.to_string(),
            data: json!({ "method": "update", "state": fields, "buffer_paths": [] }),
            seq,
        });
    }
}

macro_rules! widget_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(Widget);

        impl std::ops::Deref for $name {
            type Target = Widget;
            fn deref(&self) -> &Widget {
                &self.0
            }
        }

        impl Rich for $name {
            fn mime_bundle(&self) -> MimeBundle {
                self.0.mime_bundle()
            }
        }

        impl $name {
            /// See [`Widget::set_description_width`].
            pub fn with_description_width(self, width: &str) -> Self {
                self.0.set_description_width(width);
                self
            }

            /// Called by evcxr when the widget is the last expression of a cell.
            pub fn evcxr_display(&self) {
                self.0.evcxr_display()
            }
        }

        impl AsRef<Widget> for $name {
            fn as_ref(&self) -> &Widget {
                &self.0
            }
        }
    };
}

widget_type!(
    /// A slider over floats.
    FloatSlider
);
widget_type!(
    /// A slider over a float's exponent: equal steps multiply the value (learning rates).
    FloatLogSlider
);
widget_type!(
    /// A slider over integers.
    IntSlider
);
widget_type!(
    /// A drop-down list of labels.
    Dropdown
);
widget_type!(
    /// A check box.
    Checkbox
);
widget_type!(
    /// A row of buttons of which one is selected.
    ToggleButtons
);
widget_type!(
    /// A button; its clicks reach Rust ([`Button::clicks`], [`Button::on_click`]).
    Button
);
widget_type!(
    /// A one-line text field.
    Text
);
widget_type!(
    /// A line of text.
    Label
);
widget_type!(
    /// HTML content (an SVG chart, a table), replaceable in place.
    HtmlWidget
);
widget_type!(
    /// A progress bar.
    Progress
);
widget_type!(
    /// Children side by side.
    HBox
);
widget_type!(
    /// Children one above the other.
    VBox
);

fn f64_of(v: Value, default: f64) -> f64 {
    v.as_f64().unwrap_or(default)
}

impl FloatSlider {
    pub fn new(description: &str, value: f64, (min, max): (f64, f64), step: f64) -> Self {
        FloatSlider(Widget::open(
            ModelKind {
                kind: "FloatSlider",
                model: "FloatSliderModel",
                view: "FloatSliderView",
                style: Some("SliderStyleModel"),
            },
            json!({
                "description": description, "value": value, "min": min, "max": max,
                "step": step, "readout": true, "readout_format": ".3g",
                "continuous_update": true, "orientation": "horizontal", "disabled": false,
            }),
        ))
    }

    pub fn value(&self) -> f64 {
        f64_of(self.get("value"), 0.0)
    }

    pub fn set_value(&self, value: f64) {
        self.set(json!({ "value": value }));
    }
}

impl FloatLogSlider {
    /// A slider from `min` to `max` (both > 0) moving in steps of a tenth of a decade.
    pub fn new(description: &str, value: f64, (min, max): (f64, f64)) -> Self {
        let exp = |x: f64| x.max(f64::MIN_POSITIVE).log10();
        FloatLogSlider(Widget::open(
            ModelKind {
                kind: "FloatLogSlider",
                model: "FloatLogSliderModel",
                view: "FloatLogSliderView",
                style: Some("SliderStyleModel"),
            },
            json!({
                "description": description, "value": value, "base": 10.0,
                "min": exp(min), "max": exp(max), "step": 0.1,
                "readout": true, "readout_format": ".2e",
                "continuous_update": true, "orientation": "horizontal", "disabled": false,
            }),
        ))
    }

    pub fn value(&self) -> f64 {
        f64_of(self.get("value"), 0.0)
    }

    pub fn set_value(&self, value: f64) {
        self.set(json!({ "value": value }));
    }
}

impl IntSlider {
    pub fn new(description: &str, value: i64, (min, max): (i64, i64)) -> Self {
        IntSlider(Widget::open(
            ModelKind {
                kind: "IntSlider",
                model: "IntSliderModel",
                view: "IntSliderView",
                style: Some("SliderStyleModel"),
            },
            json!({
                "description": description, "value": value, "min": min, "max": max, "step": 1,
                "readout": true, "readout_format": "d",
                "continuous_update": true, "orientation": "horizontal", "disabled": false,
            }),
        ))
    }

    pub fn value(&self) -> i64 {
        self.get("value").as_i64().unwrap_or(0)
    }

    pub fn set_value(&self, value: i64) {
        self.set(json!({ "value": value }));
    }
}

/// Shared by the widgets that pick one of several labels.
fn options_widget<S: ToString>(
    kind: ModelKind,
    description: &str,
    options: &[S],
    selected: usize,
    extra: Value,
) -> Widget {
    let labels: Vec<String> = options.iter().map(ToString::to_string).collect();
    let index = (selected < labels.len()).then_some(selected);
    let mut state = json!({
        "description": description, "_options_labels": labels, "index": index,
        "disabled": false,
    });
    if let (Some(state), Some(extra)) = (state.as_object_mut(), extra.as_object()) {
        state.extend(extra.clone());
    }
    Widget::open(kind, state)
}

/// The label at the selected index of an options widget.
fn selected_label(w: &Widget) -> Option<String> {
    let index = w.get("index").as_u64()? as usize;
    w.get("_options_labels")
        .as_array()?
        .get(index)?
        .as_str()
        .map(str::to_owned)
}

impl Dropdown {
    pub fn new<S: ToString>(description: &str, options: &[S], selected: usize) -> Self {
        Dropdown(options_widget(
            ModelKind {
                kind: "Dropdown",
                model: "DropdownModel",
                view: "DropdownView",
                style: Some("DescriptionStyleModel"),
            },
            description,
            options,
            selected,
            json!({}),
        ))
    }

    /// The selected label.
    pub fn value(&self) -> Option<String> {
        selected_label(self)
    }

    pub fn index(&self) -> Option<usize> {
        self.get("index").as_u64().map(|i| i as usize)
    }

    pub fn set_index(&self, index: usize) {
        self.set(json!({ "index": index }));
    }
}

impl ToggleButtons {
    pub fn new<S: ToString>(description: &str, options: &[S], selected: usize) -> Self {
        ToggleButtons(options_widget(
            ModelKind {
                kind: "ToggleButtons",
                model: "ToggleButtonsModel",
                view: "ToggleButtonsView",
                style: Some("ToggleButtonsStyleModel"),
            },
            description,
            options,
            selected,
            json!({ "button_style": "", "tooltips": [], "icons": [] }),
        ))
    }

    /// The selected label.
    pub fn value(&self) -> Option<String> {
        selected_label(self)
    }

    pub fn index(&self) -> Option<usize> {
        self.get("index").as_u64().map(|i| i as usize)
    }

    pub fn set_index(&self, index: usize) {
        self.set(json!({ "index": index }));
    }
}

impl Checkbox {
    pub fn new(description: &str, value: bool) -> Self {
        Checkbox(Widget::open(
            ModelKind {
                kind: "Checkbox",
                model: "CheckboxModel",
                view: "CheckboxView",
                style: Some("CheckboxStyleModel"),
            },
            json!({ "description": description, "value": value, "indent": false, "disabled": false }),
        ))
    }

    pub fn value(&self) -> bool {
        self.get("value").as_bool().unwrap_or(false)
    }

    pub fn set_value(&self, value: bool) {
        self.set(json!({ "value": value }));
    }
}

impl Button {
    pub fn new(description: &str) -> Self {
        Button(Widget::open(
            ModelKind {
                kind: "Button",
                model: "ButtonModel",
                view: "ButtonView",
                style: Some("ButtonStyleModel"),
            },
            json!({
                "description": description, "button_style": "", "icon": "",
                "tooltip": null, "disabled": false,
            }),
        ))
    }

    /// `primary`, `success`, `info`, `warning`, `danger` or `` (the default).
    pub fn with_style(self, style: &str) -> Self {
        self.set(json!({ "button_style": style }));
        self
    }

    /// Clicks since the button was made.
    pub fn clicks(&self) -> u64 {
        self.custom_total()
    }

    /// Clicks since the last call (0 when none).
    pub fn take_clicks(&self) -> u64 {
        self.take_custom()
    }

    /// Runs `f` on every click, from a watcher thread of the cell process (so also after the
    /// cell that set it up has finished).
    /// Clicks before the call do not count.
    pub fn on_click(&self, mut f: impl FnMut() + Send + 'static) {
        let button = self.clone();
        let mut seen = button.clicks();
        watch(move || {
            let now = button.clicks();
            for _ in seen..now {
                f();
            }
            seen = now;
        });
    }

    pub fn set_description(&self, description: &str) {
        self.set(json!({ "description": description }));
    }
}

impl Text {
    pub fn new(description: &str, value: &str) -> Self {
        Text(Widget::open(
            ModelKind {
                kind: "Text",
                model: "TextModel",
                view: "TextView",
                style: Some("TextStyleModel"),
            },
            json!({
                "description": description, "value": value, "placeholder": "",
                "continuous_update": true, "disabled": false,
            }),
        ))
    }

    pub fn value(&self) -> String {
        self.get("value").as_str().unwrap_or_default().to_string()
    }

    pub fn set_value(&self, value: &str) {
        self.set(json!({ "value": value }));
    }
}

impl Label {
    pub fn new(value: &str) -> Self {
        Label(Widget::open(
            ModelKind {
                kind: "Label",
                model: "LabelModel",
                view: "LabelView",
                style: Some("LabelStyleModel"),
            },
            json!({ "value": value }),
        ))
    }

    pub fn value(&self) -> String {
        self.get("value").as_str().unwrap_or_default().to_string()
    }

    pub fn set_value(&self, value: &str) {
        self.set(json!({ "value": value }));
    }
}

impl HtmlWidget {
    pub fn new(html: &str) -> Self {
        HtmlWidget(Widget::open(
            ModelKind {
                kind: "HTML",
                model: "HTMLModel",
                view: "HTMLView",
                style: Some("HTMLStyleModel"),
            },
            json!({ "value": html, "placeholder": "" }),
        ))
    }

    pub fn value(&self) -> String {
        self.get("value").as_str().unwrap_or_default().to_string()
    }

    pub fn set_value(&self, html: &str) {
        self.set(json!({ "value": html }));
    }
}

impl Progress {
    pub fn new(description: &str, value: f64, max: f64) -> Self {
        Progress(Widget::open(
            ModelKind {
                kind: "Progress",
                model: "FloatProgressModel",
                view: "ProgressView",
                style: Some("ProgressStyleModel"),
            },
            json!({
                "description": description, "value": value, "min": 0.0, "max": max,
                "bar_style": "", "orientation": "horizontal",
            }),
        ))
    }

    pub fn value(&self) -> f64 {
        f64_of(self.get("value"), 0.0)
    }

    pub fn set_value(&self, value: f64) {
        self.set(json!({ "value": value }));
    }

    /// `success`, `info`, `warning`, `danger` or `` (the default).
    pub fn set_bar_style(&self, style: &str) {
        self.set(json!({ "bar_style": style }));
    }
}

fn children(items: &[&dyn AsRef<Widget>]) -> Value {
    json!(items
        .iter()
        .map(|w| reference(w.as_ref().model_id()))
        .collect::<Vec<_>>())
}

impl AsRef<Widget> for Widget {
    fn as_ref(&self) -> &Widget {
        self
    }
}

impl HBox {
    /// `HBox::new(&[&slider, &button])`.
    pub fn new(items: &[&dyn AsRef<Widget>]) -> Self {
        HBox(Widget::open(
            ModelKind {
                kind: "HBox",
                model: "HBoxModel",
                view: "HBoxView",
                style: None,
            },
            json!({ "children": children(items), "box_style": "" }),
        ))
    }
}

impl VBox {
    pub fn new(items: &[&dyn AsRef<Widget>]) -> Self {
        VBox(Widget::open(
            ModelKind {
                kind: "VBox",
                model: "VBoxModel",
                view: "VBoxView",
                style: None,
            },
            json!({ "children": children(items), "box_style": "" }),
        ))
    }
}

/// Calls every watcher about twenty times a second, from one thread of the cell process.
pub(crate) fn watch(f: impl FnMut() + Send + 'static) {
    type Watchers = Mutex<Vec<Box<dyn FnMut() + Send>>>;
    static WATCHERS: OnceLock<Arc<Watchers>> = OnceLock::new();
    let watchers = WATCHERS.get_or_init(|| {
        let watchers: Arc<Watchers> = Arc::new(Mutex::new(vec![]));
        let w = Arc::clone(&watchers);
        let _ = std::thread::Builder::new()
            .name("widget-watcher".into())
            .spawn(move || loop {
                super::protocol::mark_background_thread();
                std::thread::sleep(Duration::from_millis(50));
                for f in lock(&w).iter_mut() {
                    f();
                }
            });
        watchers
    });
    lock(watchers).push(Box::new(f));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_the_kernel_values_live_in_memory() {
        let s = FloatSlider::new("lr", 0.1, (0.0, 1.0), 0.01);
        assert_eq!(s.value(), 0.1);
        s.set_value(0.25);
        assert_eq!(s.value(), 0.25);
        let d = Dropdown::new("optimizer", &["adamw", "adamw_8bit"], 1);
        assert_eq!(d.value().as_deref(), Some("adamw_8bit"));
        d.set_index(0);
        assert_eq!(d.value().as_deref(), Some("adamw"));
        let b = Button::new("stop");
        assert_eq!(b.clicks(), 0);
        let bundle = HBox::new(&[&s, &b]).mime_bundle();
        let view: Value =
            serde_json::from_str(&bundle["application/vnd.jupyter.widget-view+json"]).unwrap();
        assert_eq!(view["version_major"], 2);
        assert!(s.get("layout").as_str().unwrap().starts_with("IPY_MODEL_"));
        assert_eq!(s.get("_model_name"), "FloatSliderModel");
    }

    #[test]
    fn the_page_s_changes_are_read_from_the_side_file_unless_set_here_later() {
        // Stand in for the kernel: a state folder with the comm's file.
        let dir = std::env::temp_dir().join(format!("peft-widgets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var(ENV_STATE_DIR, &dir);
        let s = IntSlider::new("n", 1, (0, 10));
        let write = |version: u64, value: i64, cell_seq: u64, clicks: u64| {
            let mut state = Map::new();
            state.insert("value".into(), json!(value));
            let st = CommState {
                version,
                state,
                custom_count: clicks,
                custom: vec![],
                cell_seq,
            };
            std::fs::write(
                comm_state_path(&dir, s.model_id()),
                serde_json::to_vec(&st).unwrap(),
            )
            .unwrap();
        };
        write(2, 7, 0, 0);
        assert_eq!(s.value(), 7, "the page moved it");
        s.set_value(3); // not yet merged by the kernel
        let mine = SEQ.load(Ordering::Relaxed);
        write(3, 7, mine - 1, 0);
        assert_eq!(s.value(), 3, "our later value wins over an older file");
        write(4, 9, mine, 0);
        assert_eq!(s.value(), 9, "the page's change after ours wins");
        std::env::remove_var(ENV_STATE_DIR);
        let _ = std::fs::remove_dir_all(dir);
    }
}
