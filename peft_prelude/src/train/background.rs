//! Training that does not block the notebook: [`Trainer::spawn`] moves the trainer to a thread
//! of the cell process (where the notebook's variables live) and returns a [`RunHandle`] at
//! once. The same loop runs as in the foreground; between two steps it applies what the
//! handle or the run's panel asked for: a new learning rate or end, pause, resume, stop, a
//! sample generated from the current adapter. Its progress bar, loss curve and controls are
//! widgets, so they keep updating after the cell that started the run has finished, while
//! other cells run.
//!
//! One run trains in the background at a time, and a foreground `train()` waits for none:
//! while a background run trains, a second one (in the background or foreground) is refused
//! with the name of the one training. The CPU or GPU is shared, and two runs side by side
//! would each run at half speed while holding twice the memory. Foreground runs do not
//! exclude each other: in a notebook cells run one after the other, and a program of the
//! user's that trains on several threads at once (a test suite, a sweep) asked for it. An interrupt, a kernel shutdown or a
//! restart stops a background run after its current step, with a checkpoint when
//! `save_steps` asks for checkpoints; the run history is saved either way.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::history::{LogEntry, RunHistory};
use super::trainer::{Between, Monitor, Objective, TrainOutput, Trainer, TrainerCore};
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationConfig};
use crate::model::CausalLm;
use crate::notebook::widgets::{Button, FloatLogSlider, HBox, HtmlWidget, Text, VBox, Widget};
use crate::notebook::{self, escape_html, LinePlot, MimeBundle, ProgressBar, Rich};
use crate::sync::lock;

/// The run training in the background now, by name (one at a time).
static ACTIVE: Mutex<Option<String>> = Mutex::new(None);

/// Held while a background run trains; refuses a second run.
pub(crate) struct Exclusive(());

impl Exclusive {
    /// Claims the background slot for `run`.
    pub(crate) fn take(run: &str) -> Result<Self> {
        let mut active = lock(&ACTIVE);
        refuse_beside(active.as_deref())?;
        *active = Some(run.to_string());
        Ok(Exclusive(()))
    }

    /// For a foreground run: refused while a background run trains.
    pub(crate) fn check_free() -> Result<()> {
        refuse_beside(lock(&ACTIVE).as_deref())
    }
}

fn refuse_beside(active: Option<&str>) -> Result<()> {
    match active {
        Some(other) => Err(Error::InvalidArgument(format!(
            "`{other}` is training in the background; one run trains at a time (they share the \
             CPU or GPU): stop() or wait() it first"
        ))),
        None => Ok(()),
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        *lock(&ACTIVE) = None;
    }
}

/// Where a background run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunState {
    Running,
    Paused,
    /// Reached its last step.
    Finished,
    /// Stopped by [`RunHandle::stop`] (everything learned kept).
    Stopped,
    /// Stopped by a notebook interrupt or a kernel shutdown (everything learned kept).
    Interrupted,
    /// Ended with an error ([`RunStatus::error`]); the trainer is as it was before the
    /// failing step.
    Failed,
}

/// A snapshot of a background run.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub run: String,
    pub state: RunState,
    pub step: usize,
    pub total_steps: usize,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub error: Option<String>,
}

/// Receives text as it is generated.
type TextSink = Box<dyn FnMut(&str) + Send>;

/// A request to generate from the current adapter between two steps.
struct SampleRequest {
    prompt: String,
    max_new_tokens: usize,
    reply: mpsc::Sender<Result<String>>,
    /// Receives the text as it is generated.
    stream: Option<TextSink>,
}

/// What the handle and the panel asked for, applied between steps.
#[derive(Default)]
struct Commands {
    paused: bool,
    stop: bool,
    learning_rate: Option<f64>,
    max_steps: Option<usize>,
    logging_steps: Option<usize>,
    eval_steps: Option<Option<usize>>,
    samples: VecDeque<SampleRequest>,
}

struct Shared {
    commands: Mutex<Commands>,
    wake: Condvar,
    status: Mutex<RunStatus>,
    history: Mutex<Vec<LogEntry>>,
}

impl Shared {
    fn command(&self, f: impl FnOnce(&mut Commands)) {
        f(&mut lock(&self.commands));
        self.wake.notify_all();
    }

    fn set_state(&self, state: RunState) {
        lock(&self.status).state = state;
    }
}

/// A run training in the background: see the module documentation.
pub struct RunHandle<O> {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Trainer<O>>>,
    panel: Panel,
}

impl<O: Objective + Send + 'static> Trainer<O> {
    /// Starts training in the background and returns at once; the cell shows the run's panel
    /// (progress, loss curve, learning rate, pause, stop, a prompt to sample from). Get the
    /// trainer back with [`RunHandle::wait`].
    pub fn spawn(self) -> Result<RunHandle<O>> {
        let launch = Launch::prepare(&self.core)?;
        let (shared, panel) = (Arc::clone(&launch.shared), launch.monitor.panel.clone());
        let thread = std::thread::Builder::new()
            .name(format!("training {}", launch.name))
            .spawn(move || {
                let mut trainer = self;
                launch.run(&mut trainer.core, &mut trainer.objective);
                trainer
            })
            .map_err(|e| {
                Error::InvalidArgument(format!("cannot start the training thread: {e}"))
            })?;
        Ok(RunHandle {
            shared,
            thread: Some(thread),
            panel,
        })
    }
}

/// A background run made ready before its thread starts (the panel shown, the slot claimed),
/// and the thread's work: the non-generic part of [`Trainer::spawn`].
struct Launch {
    name: String,
    exclusive: Exclusive,
    marker: RunMarker,
    shared: Arc<Shared>,
    monitor: WidgetMonitor,
}

impl Launch {
    fn prepare(core: &TrainerCore) -> Result<Self> {
        let name = core.args.run_name();
        let exclusive = Exclusive::take(&name)?;
        let shared = Arc::new(Shared {
            commands: Mutex::new(Commands::default()),
            wake: Condvar::new(),
            status: Mutex::new(RunStatus {
                run: name.clone(),
                state: RunState::Running,
                step: core.state().global_step,
                total_steps: core.total_steps(),
                loss: None,
                learning_rate: None,
                error: None,
            }),
            history: Mutex::new(core.state().log_history.clone()),
        });
        let panel = Panel::new(&name, core.args.learning_rate, Arc::clone(&shared));
        notebook::show(&panel);
        let marker = RunMarker::create(&name);
        let mut monitor = WidgetMonitor {
            panel,
            progress: ProgressBar::detached(core.total_steps() as u64, &format!("training {name}")),
            plot: LinePlot::new("training loss").y_label("loss"),
            last_plot: None,
            shared: Arc::clone(&shared),
        };
        for e in &core.state().log_history {
            monitor.plot.add_point(&name, e.step as f64, e.loss);
        }
        Ok(Launch {
            name,
            exclusive,
            marker,
            shared,
            monitor,
        })
    }

    /// The training thread: the loop with the run's commands between steps, then its end
    /// state, a checkpoint when stopped early, and answers to samples left waiting.
    fn run(self, core: &mut TrainerCore, objective: &mut dyn Objective) {
        let Launch {
            exclusive: _exclusive,
            marker: _marker,
            shared,
            mut monitor,
            ..
        } = self;
        notebook::mark_background_thread();
        let interrupts_at_start = notebook::interrupt_count();
        let mut between = |t: &mut TrainerCore, o: &mut dyn Objective| {
            between_steps(t, o, &shared, interrupts_at_start)
        };
        let result = core.run(objective, usize::MAX, &mut monitor, &mut between);
        let (state, error) = match &result {
            Ok(out) if out.interrupted => (RunState::Interrupted, None),
            Ok(_) if core.state().global_step >= core.total_steps() => (RunState::Finished, None),
            Ok(_) => {
                let asked = lock(&shared.commands).stop;
                if asked {
                    (RunState::Stopped, None)
                } else {
                    (RunState::Interrupted, None)
                }
            }
            Err(e) => (RunState::Failed, Some(e.to_string())),
        };
        // Stopped early: keep a checkpoint when the run keeps checkpoints.
        let early = matches!(state, RunState::Stopped | RunState::Interrupted);
        if early && core.args.save_steps.is_some() {
            if let Err(e) = core.save_checkpoint() {
                eprintln!("could not save a checkpoint of the stopped run: {e}");
            }
        }
        {
            let mut status = lock(&shared.status);
            status.state = state;
            status.error = error;
            status.step = core.state().global_step;
        }
        monitor.finished(state, &result);
        // Unanswered sample requests learn the run ended.
        let pending = std::mem::take(&mut lock(&shared.commands).samples);
        for r in pending {
            let _ = r.reply.send(Err(Error::InvalidArgument(
                "the run ended before the sample was generated".into(),
            )));
        }
    }
}

/// Between two steps of a background run: settings, samples, pause, stop, interrupts.
fn between_steps(
    t: &mut TrainerCore,
    objective: &mut dyn Objective,
    shared: &Shared,
    interrupts_at_start: u64,
) -> Result<Between> {
    loop {
        let (settings, samples, paused, stop) = {
            let mut c = lock(&shared.commands);
            let settings = (
                c.learning_rate.take(),
                c.max_steps.take(),
                c.logging_steps.take(),
                c.eval_steps.take(),
            );
            (settings, std::mem::take(&mut c.samples), c.paused, c.stop)
        };
        let (lr, max_steps, logging, eval) = settings;
        let mut problems = vec![];
        if let Some(lr) = lr {
            problems.extend(t.set_learning_rate(lr).err());
        }
        if let Some(n) = max_steps {
            problems.extend(t.set_max_steps(n, objective.units()).err());
        }
        if let Some(n) = logging {
            t.args.logging_steps = n;
        }
        if let Some(e) = eval {
            t.args.eval_steps = e;
        }
        {
            let mut status = lock(&shared.status);
            status.total_steps = t.total_steps();
            status.error = problems.first().map(|e| e.to_string());
        }
        for request in samples {
            let text = sample(t, &request.prompt, request.max_new_tokens, request.stream);
            let _ = request.reply.send(text);
        }
        if stop || notebook::interrupt_count() > interrupts_at_start {
            return Ok(Between::Stop);
        }
        if !paused {
            shared.set_state(RunState::Running);
            return Ok(Between::Continue);
        }
        shared.set_state(RunState::Paused);
        let c = lock(&shared.commands);
        let _ = shared
            .wake
            .wait_timeout(c, Duration::from_millis(200))
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Greedy text from the current adapter (dropout off), `stream` receiving it as it comes.
fn sample(
    t: &mut TrainerCore,
    prompt: &str,
    max_new_tokens: usize,
    mut stream: Option<TextSink>,
) -> Result<String> {
    t.model.eval();
    let config =
        GenerationConfig::for_model(t.model.config(), &t.tokenizer, None)?.greedy(max_new_tokens);
    let mut streamer = |piece: &str| {
        if let Some(f) = stream.as_mut() {
            f(piece)
        }
    };
    let out = generate(&t.model, &t.tokenizer, prompt, &config, Some(&mut streamer));
    t.model.train();
    Ok(out?.text().to_string())
}

impl<O> RunHandle<O> {
    /// Where the run stands.
    pub fn status(&self) -> RunStatus {
        lock(&self.shared.status).clone()
    }

    /// The run's log so far.
    pub fn history(&self) -> RunHistory {
        RunHistory {
            name: self.status().run,
            entries: lock(&self.shared.history).clone(),
        }
    }

    /// Changes the peak learning rate from the next step on (see
    /// [`Trainer::set_learning_rate`]); the panel's slider follows.
    pub fn set_learning_rate(&self, learning_rate: f64) {
        self.panel.learning_rate.set_value(learning_rate);
        self.shared
            .command(|c| c.learning_rate = Some(learning_rate));
    }

    /// Changes where the run ends (see [`Trainer::set_max_steps`]).
    pub fn set_max_steps(&self, max_steps: usize) {
        self.shared.command(|c| c.max_steps = Some(max_steps));
    }

    pub fn set_logging_steps(&self, steps: usize) {
        self.shared.command(|c| c.logging_steps = Some(steps));
    }

    pub fn set_eval_steps(&self, steps: Option<usize>) {
        self.shared.command(|c| c.eval_steps = Some(steps));
    }

    /// Pauses after the current step (samples are still answered while paused).
    pub fn pause(&self) {
        self.shared.command(|c| c.paused = true);
        self.panel.pause.set_description("resume");
    }

    pub fn resume(&self) {
        self.shared.command(|c| c.paused = false);
        self.panel.pause.set_description("pause");
    }

    /// Stops after the current step, keeping everything learned.
    pub fn stop(&self) {
        self.shared.command(|c| c.stop = true);
    }

    /// Whether the run has ended (finished, stopped, interrupted or failed).
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Greedy text for `prompt` from the adapter as it is now, generated between two steps
    /// (at most one step's wait), up to `max_new_tokens` tokens.
    pub fn sample(&self, prompt: &str, max_new_tokens: usize) -> Result<String> {
        if self.is_done() {
            return Err(Error::InvalidArgument(
                "the run has ended: sample from the trainer wait() returns".into(),
            ));
        }
        let (reply, answer) = mpsc::channel();
        self.shared.command(|c| {
            c.samples.push_back(SampleRequest {
                prompt: prompt.to_string(),
                max_new_tokens,
                reply,
                stream: None,
            })
        });
        answer.recv().map_err(|_| {
            Error::InvalidArgument("the run ended before the sample was generated".into())
        })?
    }

    /// Waits for the run to end and returns the trainer (to save, evaluate, train on). Errors
    /// only when the training thread itself died; a failed run's error is in
    /// [`status`](Self::status).
    pub fn wait(mut self) -> Result<Trainer<O>> {
        let thread = self.thread.take().expect("a handle waits once");
        thread.join().map_err(|_| {
            Error::InvalidArgument("the training thread panicked; the trainer is lost".into())
        })
    }

    /// The run's panel (shown by `spawn`): display it again anywhere.
    pub fn panel(&self) -> &VBox {
        &self.panel.root
    }
}

impl<O> Rich for RunHandle<O> {
    fn mime_bundle(&self) -> MimeBundle {
        let s = self.status();
        let mut bundle = self.panel.root.mime_bundle();
        bundle.insert(
            "text/plain".into(),
            format!("{} {:?}: step {}/{}", s.run, s.state, s.step, s.total_steps),
        );
        bundle
    }
}

/// The widgets of a background run: progress, loss curve, controls, sampling.
#[derive(Clone)]
struct Panel {
    root: VBox,
    progress: HtmlWidget,
    curve: HtmlWidget,
    learning_rate: FloatLogSlider,
    pause: Button,
    /// Every control, greyed out when the run ends.
    controls: Vec<Widget>,
}

impl Panel {
    fn new(run: &str, learning_rate: f64, shared: Arc<Shared>) -> Self {
        let progress = HtmlWidget::new(&format!("training {run}: starting…"));
        let curve = HtmlWidget::new("");
        let lr = FloatLogSlider::new(
            "learning rate",
            learning_rate,
            (learning_rate / 100.0, learning_rate * 100.0),
        )
        .with_description_width("initial");
        let pause = Button::new("pause");
        let stop = Button::new("stop").with_style("danger");
        let prompt = Text::new("prompt", "");
        let sample = Button::new("sample").with_style("info");
        let answer = HtmlWidget::new("");
        let controls = HBox::new(&[&lr, &pause, &stop]);
        let sampling = HBox::new(&[&prompt, &sample]);
        let root = VBox::new(&[&progress, &curve, &controls, &sampling, &answer]);
        let panel = Panel {
            root,
            progress,
            curve,
            learning_rate: lr.clone(),
            pause: pause.clone(),
            controls: [&*lr, &*pause, &*stop, &*prompt, &*sample]
                .map(Widget::clone)
                .to_vec(),
        };
        // The controls act through the same commands as the handle.
        {
            let shared = Arc::clone(&shared);
            let mut last = learning_rate;
            let slider = lr;
            crate::notebook::widgets::watch(move || {
                let v = slider.value();
                if v != last && v.is_finite() && v > 0.0 {
                    last = v;
                    shared.command(|c| c.learning_rate = Some(v));
                }
            });
        }
        {
            let shared = Arc::clone(&shared);
            let button = pause.clone();
            pause.on_click(move || {
                let paused = !lock(&shared.commands).paused;
                shared.command(|c| c.paused = paused);
                button.set_description(if paused { "resume" } else { "pause" });
            });
        }
        {
            let shared = Arc::clone(&shared);
            stop.on_click(move || shared.command(|c| c.stop = true));
        }
        {
            let shared = Arc::clone(&shared);
            sample.on_click(move || {
                let text = prompt.value();
                let answer = answer.clone();
                answer.set_value("<i>generating after the current step…</i>");
                let (reply, result) = mpsc::channel();
                // Each piece redraws the answer; the kernel merges a widget's updates to 10
                // per second.
                let shown = answer.clone();
                let mut so_far = String::new();
                let stream: TextSink = Box::new(move |piece: &str| {
                    so_far.push_str(piece);
                    shown.set_value(&pre(&so_far));
                });
                shared.command(|c| {
                    c.samples.push_back(SampleRequest {
                        prompt: text,
                        max_new_tokens: 64,
                        reply,
                        stream: Some(stream),
                    })
                });
                // The final text once it is done, from a thread of its own.
                std::thread::spawn(move || {
                    notebook::mark_background_thread();
                    match result.recv() {
                        Ok(Ok(text)) => answer.set_value(&pre(&text)),
                        Ok(Err(e)) => answer
                            .set_value(&format!("<b>error:</b> {}", escape_html(&e.to_string()))),
                        Err(_) => answer.set_value("<i>the run ended</i>"),
                    }
                });
            });
        }
        panel
    }
}

impl Rich for Panel {
    fn mime_bundle(&self) -> MimeBundle {
        self.root.mime_bundle()
    }
}

fn pre(text: &str) -> String {
    format!(
        "<pre style=\"white-space: pre-wrap\">{}</pre>",
        escape_html(text)
    )
}

/// A background run's progress and curve, drawn into the panel's widgets.
struct WidgetMonitor {
    panel: Panel,
    progress: ProgressBar,
    plot: LinePlot,
    last_plot: Option<Instant>,
    shared: Arc<Shared>,
}

impl WidgetMonitor {
    fn draw_plot(&mut self) {
        self.last_plot = Some(Instant::now());
        self.panel.curve.set_value(&self.plot.svg());
    }

    fn finished(&mut self, state: RunState, result: &Result<TrainOutput>) {
        let note = match (state, result) {
            (RunState::Failed, Err(e)) => format!(" — failed: {}", escape_html(&e.to_string())),
            (state, _) => format!(" — {state:?}").to_lowercase(),
        };
        self.panel
            .progress
            .set_value(&format!("{}{note}", self.progress.html()));
        for control in &self.panel.controls {
            control.set_disabled(true);
        }
        self.draw_plot();
    }
}

impl Monitor for WidgetMonitor {
    fn begin(&mut self, _run: &str, first_step: usize, total: usize) {
        self.progress.set_length(total as u64);
        self.progress.set_position(first_step as u64, &[]);
        self.panel.progress.set_value(&self.progress.html());
    }

    fn step(&mut self, run: &str, entry: &LogEntry, total: usize, plotted: &[(&str, f64)]) {
        self.plot.add_point(run, entry.step as f64, entry.loss);
        let mut shown = vec![("loss", entry.loss), ("lr", entry.learning_rate)];
        for &(name, v) in plotted {
            self.plot.add_point(name, entry.step as f64, v);
            shown.push((name, v));
        }
        self.progress.set_length(total as u64);
        self.progress.set_position(entry.step as u64, &shown);
        // The kernel merges a widget's updates to 10 per second; the curve is throttled here
        // too because drawing its SVG is the costly part.
        self.panel.progress.set_value(&self.progress.html());
        if self
            .last_plot
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
        {
            self.draw_plot();
        }
        let mut status = lock(&self.shared.status);
        status.step = entry.step;
        status.total_steps = total;
        status.loss = Some(entry.loss);
        status.learning_rate = Some(entry.learning_rate);
        drop(status);
        lock(&self.shared.history).push(entry.clone());
    }

    fn end(&mut self) {}
}

/// The marker file that tells the kernel a background run trains (it waits for the run to
/// stop at shutdown); removed when the run ends.
struct RunMarker(Option<std::path::PathBuf>);

impl RunMarker {
    fn create(run: &str) -> Self {
        let Some(dir) = std::env::var_os(peft_protocol::ENV_STATE_DIR) else {
            return RunMarker(None);
        };
        let id: String = run
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = peft_protocol::run_marker(std::path::Path::new(&dir), &id);
        match std::fs::write(&path, b"") {
            Ok(()) => RunMarker(Some(path)),
            Err(_) => RunMarker(None),
        }
    }
}

impl Drop for RunMarker {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_run_excludes_others_but_foreground_runs_do_not_exclude_each_other() {
        // Foreground runs only check: any number may train side by side.
        Exclusive::check_free().unwrap();
        Exclusive::check_free().unwrap();
        let slot = Exclusive::take("first").unwrap();
        let refused = Exclusive::check_free().unwrap_err().to_string();
        assert!(
            refused.contains("`first` is training in the background"),
            "{refused}"
        );
        assert!(Exclusive::take("second").is_err());
        drop(slot);
        Exclusive::check_free().unwrap();
        drop(Exclusive::take("third").unwrap());
    }
}
