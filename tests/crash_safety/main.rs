//! Saves survive `kill -9` and a full disk; training resumed after a kill continues the same
//! loss curve.
//!
//! A child process saves one kind of file over and over (an adapter with `save_pretrained`, a
//! trainer checkpoint, a merged 16-bit model, a GGUF export, the run history) and the parent
//! kills it with SIGKILL at seeded random moments: after each kill, what is on disk under the
//! final names must load whole. A second child saves once over a good save with its file size
//! limited (RLIMIT_FSIZE: every write past the limit fails, as on a full disk): the save must
//! return an error naming a file and leave the previous save loadable, with no temporary file
//! left behind. Last, a training run that checkpoints every step is killed mid-run and resumed
//! from its last whole checkpoint: the loss curve equals an uninterrupted run's.
//!
//!   cargo test --test crash_safety               # CI
//!   cargo test --test crash_safety -- --kills 50 # more kills per kind

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use peft_prelude::data::Dataset;
use peft_prelude::model::{LoadOptions, Pretrained};
use peft_prelude::peft::{get_peft_model, LoraConfig, PeftModel};
use peft_prelude::quant::gguf_export::{save_gguf, GgufExport};
use peft_prelude::train::{RunHistory, SftTrainer, TrainingArgs};

const KINDS: [&str; 5] = ["adapter", "checkpoint", "merged", "gguf", "history"];

fn base() -> Pretrained {
    Pretrained::from_dir(
        peft_tests::fixture("families/qwen2"),
        &LoadOptions::default(),
    )
    .expect("the tiny Qwen 2 loads")
}

fn records() -> Dataset {
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}?"), "completion": format!(" A{i}.")}))
        .collect();
    Dataset::from_records(&rows).unwrap()
}

fn trainer(out: &Path, max_steps: i64, save_steps: Option<usize>) -> SftTrainer {
    let p = base();
    let peft = get_peft_model(p.model, LoraConfig::all_projections(4, 8.0)).unwrap();
    let args = TrainingArgs {
        output_dir: out.to_path_buf(),
        per_device_train_batch_size: 2,
        learning_rate: 1e-2,
        max_steps,
        warmup_steps: 1,
        logging_steps: 1,
        max_seq_length: 16,
        save_steps,
        ..Default::default()
    };
    SftTrainer::new(peft, p.tokenizer, &records(), args).unwrap()
}

/// Saves `kind` under `out` again and again (each save different from the last), printing
/// `saved N` after each; with `once`, saves one time and prints the outcome.
fn writer(kind: &str, out: &Path, once: bool) {
    writer_limited(kind, out, once, None)
}

/// [`writer`], with writes limited to `limit` bytes per file from the first save on (after
/// the training step, which writes its run history).
fn writer_limited(kind: &str, out: &Path, once: bool, limit: Option<u64>) {
    let mut t = trainer(&out.join("run"), 1_000_000, None);
    let tokenizer = base().tokenizer;
    for i in 0u64.. {
        // A training step changes the adapter, so every save writes new bytes.
        t.train_steps(1).unwrap();
        if let Some(bytes) = limit {
            limit_file_size(bytes);
        }
        let result = match kind {
            "adapter" => t.model().save_pretrained(out.join("adapter")),
            "checkpoint" => {
                // Every other save replaces the checkpoint of the same step.
                let first = t.save_checkpoint().map(|_| ());
                first.and_then(|()| {
                    if i % 2 == 0 {
                        t.save_checkpoint().map(|_| ())
                    } else {
                        Ok(())
                    }
                })
            }
            "merged" => {
                t.model()
                    .save_pretrained_merged(out.join("merged"), &tokenizer, "merged_16bit")
            }
            "gguf" => save_gguf(
                t.model().model(),
                out.join("model.gguf"),
                GgufExport::F16,
                &tokenizer,
            ),
            "history" => t.history().save(out),
            other => panic!("unknown kind {other}"),
        };
        match (once, result) {
            (false, r) => {
                r.unwrap();
                println!("saved {i}");
            }
            (true, Ok(())) => {
                println!("ok");
                return;
            }
            (true, Err(e)) => {
                println!("error: {}", e.to_string().replace('\n', " "));
                return;
            }
        }
    }
}

/// Checks that the last whole save of `kind` under `out` loads and works.
fn verify(kind: &str, out: &Path) -> Result<String, String> {
    let err = |e: peft_prelude::Error| e.to_string();
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let finite = |t: Tensor| -> Result<(), String> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter()
            .all(|x| x.is_finite())
            .then_some(())
            .ok_or_else(|| "non-finite logits".to_string())
    };
    match kind {
        "adapter" => {
            let peft =
                PeftModel::from_pretrained(base().model, out.join("adapter")).map_err(err)?;
            finite(peft.forward(&ids).map_err(err)?)?;
            Ok("adapter".into())
        }
        "checkpoint" => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(out.join("run"))
                .map_err(|e| e.to_string())?
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("checkpoint-")
                })
                .collect();
            found.sort();
            if found.is_empty() {
                return Err("no checkpoint".into());
            }
            for dir in &found {
                let mut t = trainer(&out.join("verify"), 1_000_000, None);
                t.resume_from_checkpoint(dir)
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            Ok(format!("{} checkpoints", found.len()))
        }
        "merged" => {
            let p =
                Pretrained::from_dir(out.join("merged"), &LoadOptions::default()).map_err(err)?;
            finite(p.model.forward(&ids).map_err(err)?)?;
            Ok("merged".into())
        }
        "gguf" => {
            let p = Pretrained::from_gguf(out.join("model.gguf"), &LoadOptions::default())
                .map_err(err)?;
            finite(p.model.forward(&ids).map_err(err)?)?;
            Ok("gguf".into())
        }
        "history" => {
            let runs = RunHistory::load_all(out).map_err(err)?;
            if runs.is_empty() || runs[0].entries.is_empty() {
                return Err("no run history".into());
            }
            Ok(format!("{} entries", runs[0].entries.len()))
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Kill moments in [0, n) from the prelude's seeded generator.
struct Rng(peft_prelude::rng::Rng);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
}

fn child(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(args).env("RAYON_NUM_THREADS", "1");
    c
}

/// Kills a writer of `kind` `kills` times at random moments; after each, the save loads.
fn kill_test(kind: &str, out: &Path, kills: u32, rng: &mut Rng) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).unwrap();
    let mut saves_seen = 0;
    for k in 0..kills {
        let mut c = child(&["--writer", kind, out.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
        // The first kill waits for one whole save (its "saved" line: the trainer's progress
        // line comes first, and a kill right after it found no save on a loaded machine);
        // later ones strike anywhere.
        if k == 0 {
            for line in lines.by_ref() {
                if line.map_or(true, |l| l.starts_with("saved")) {
                    break;
                }
            }
        }
        let delay = Duration::from_millis(rng.below(400));
        let t0 = Instant::now();
        std::thread::sleep(delay);
        c.kill().unwrap();
        c.wait().unwrap();
        let saved = lines
            .map_while(Result::ok)
            .filter(|l| l.starts_with("saved"))
            .count();
        saves_seen += saved;
        let what = verify(kind, out).map_err(|e| {
            format!(
                "{kind}: after a SIGKILL {:?} into the writer ({saved} saves): {e}",
                t0.elapsed()
            )
        })?;
        if k == 0 || k + 1 == kills {
            println!("{kind}: kill {k} after {delay:?}: {what} load");
        }
    }
    println!("{kind}: {kills} kills, {saves_seen}+ saves completed between them, every kill left a whole save");
    Ok(())
}

/// Saves over a good save with writes failing past `limit` bytes: an error, the old save intact.
fn full_disk_test(kind: &str, out: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).unwrap();
    // A good save first (a kill after one whole save).
    kill_test(kind, out, 1, &mut Rng(peft_prelude::rng::Rng::new(1)))?;
    let before = verify(kind, out)?;
    let c = child(&["--full", kind, out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = c.id();
    let o = c.wait_with_output().unwrap();
    // The last line (the training progress line comes before it).
    let said = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    if !said.starts_with("error: ") {
        return Err(format!(
            "{kind}: a save onto a full disk gave `{said}` ({})",
            o.status
        ));
    }
    if !said.contains(&*out.to_string_lossy()) {
        return Err(format!("{kind}: the error does not name the file: {said}"));
    }
    let after = verify(kind, out).map_err(|e| format!("{kind}: after a failed save: {e}"))?;
    let leftovers: Vec<String> = walk(out)
        .into_iter()
        .filter(|p| {
            // The failed save's own temporaries (killed writers before it could not clean up;
            // the next save of the same file removes theirs).
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.contains(".tmp-") && name.ends_with(&format!("-{pid}"))
        })
        .map(|p| p.display().to_string())
        .collect();
    if !leftovers.is_empty() {
        return Err(format!(
            "{kind}: temporary files left after a failed save: {leftovers:?}"
        ));
    }
    println!("{kind}: full disk: `{said}`; before {before}, after {after}");
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// Trains with a checkpoint after each step, killed mid-run (a step and its checkpoint take
/// about 2 ms here, so the kill lands inside either); resumed from the last whole checkpoint,
/// the run's losses equal an uninterrupted run's, bit for bit.
const RESUME_STEPS: i64 = 64;

fn resume_test(out: &Path, rng: &mut Rng) -> Result<(), String> {
    const STEPS: i64 = RESUME_STEPS;
    let _ = std::fs::remove_dir_all(out);
    let straight: Vec<f64> = {
        let mut t = trainer(&out.join("straight"), STEPS, None);
        t.train().unwrap();
        t.history().entries.iter().map(|e| e.loss).collect()
    };
    let run = out.join("killed");
    let mut c = child(&["--train", run.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the third checkpoint, then kill at a random moment of the steps after it.
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("checkpoint-3") {
            break;
        }
    }
    std::thread::sleep(Duration::from_micros(rng.below(40_000)));
    c.kill().unwrap();
    c.wait().unwrap();
    let mut checkpoints: Vec<(usize, PathBuf)> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name.strip_prefix("checkpoint-")?.parse().ok()?, e.path()))
        })
        .collect();
    checkpoints.sort();
    let (step, last) = checkpoints
        .last()
        .cloned()
        .ok_or("no checkpoint after the kill")?;
    let mut t = trainer(&run, STEPS, Some(1));
    t.resume_from_checkpoint(&last)
        .map_err(|e| format!("resume from {}: {e}", last.display()))?;
    t.train().map_err(|e| e.to_string())?;
    let resumed: Vec<f64> = t.history().entries.iter().map(|e| e.loss).collect();
    if resumed != straight {
        return Err(format!(
            "resumed from step {step}: losses {resumed:?}, uninterrupted {straight:?}"
        ));
    }
    if step as i64 >= STEPS {
        return Err(format!(
            "the kill came after the run had ended (checkpoint-{step})"
        ));
    }
    println!("resume: killed after checkpoint-{step} of {STEPS}, resumed: {} losses equal to the uninterrupted run's", resumed.len());
    Ok(())
}

fn limit_file_size(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: plain libc calls with valid arguments; ignoring SIGXFSZ makes a write past the
    // limit fail with EFBIG instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.get(1).copied() {
        Some("--writer") => return writer(a[2], Path::new(a[3]), false),
        Some("--full") => {
            return writer_limited(a[2], Path::new(a[3]), true, Some(128));
        }
        Some("--train") => {
            let mut t = trainer(Path::new(a[2]), RESUME_STEPS, Some(1));
            for _ in 0..RESUME_STEPS {
                t.train_steps(1).unwrap();
                println!("saved checkpoint-{}", t.state().global_step);
            }
            return;
        }
        _ => {}
    }
    let kills: u32 = a
        .iter()
        .position(|s| *s == "--kills")
        .and_then(|i| a.get(i + 1)?.parse().ok())
        .unwrap_or(12);
    let work = std::env::temp_dir().join(format!("peft-crash-safety-{}", std::process::id()));
    let mut rng = Rng(peft_prelude::rng::Rng::new(0xC0FFEE));
    let mut failures = vec![];
    for kind in KINDS {
        if let Err(e) = kill_test(kind, &work.join(kind), kills, &mut rng) {
            failures.push(e);
        }
        if let Err(e) = full_disk_test(kind, &work.join(format!("{kind}-full"))) {
            failures.push(e);
        }
    }
    if let Err(e) = resume_test(&work.join("resume"), &mut rng) {
        failures.push(format!("resume: {e}"));
    }
    let _ = std::fs::remove_dir_all(&work);
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        std::process::exit(1);
    }
    println!("crash_safety: all kinds survived {kills} kills each and a full disk; resume reproduced the run");
}
