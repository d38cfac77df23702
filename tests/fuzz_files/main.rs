//! A seeded mutation fuzzer for every kind of file the prelude reads (GGUF, safetensors, model,
//! generation and tokenizer configs, tokenizer.json, sharded indexes, PEFT adapters, datasets,
//! trainer checkpoints). Each case mutates a known-good file, loads it through the public API a
//! notebook uses and, if it loads, uses it (a forward pass, an encode, a training step).
//!
//! Cases run in child processes (a memory limit, a timeout per case): a child runs cases one
//! after another and reports each; when a child dies (abort, segfault) or a case hangs, the
//! parent records that case and starts a new child at the next. Classes:
//!   ok     loaded and used cleanly       error  a typed error (the good outcome for most cases)
//!   panic  a panic escaped the loader    abort  the process aborted (allocation failure ...)
//!   crash  killed by another signal      hang   the case ran past the timeout
//!   absurd loaded "ok" but wrong (non-finite logits, a file outside the model directory ...)
//!   damaged  a well-formed file whose weight values were changed (finite, but large enough
//!          to overflow a forward pass): undetectable by any loader, counted apart
//!   nameless an error that names no file (every file error must say which file)
//!
//!   cargo test --test fuzz_files                      # CI: 400 cases per kind, asserts 0 bad
//!   cargo test --test fuzz_files -- --cases 100000    # scripts/fuzz-files.sh: the table
//!   cargo test --test fuzz_files -- --kinds gguf --first 1234 --cases 1 --verbose  # one case

mod kinds;
mod mutate;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CLASSES: [&str; 9] = [
    "ok", "error", "damaged", "panic", "abort", "crash", "hang", "absurd", "nameless",
];
const BAD: [&str; 6] = ["panic", "abort", "crash", "hang", "absurd", "nameless"];

struct Options {
    cases: u64,
    first: u64,
    seed: u64,
    kinds: Vec<String>,
    mem_mb: u64,
    timeout: Duration,
    verbose: bool,
    work: PathBuf,
}

fn parse_args(args: &[String]) -> Options {
    let mut o = Options {
        cases: std::env::var("PEFT_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(400),
        first: 0,
        seed: 0x5eed,
        kinds: kinds::KINDS.iter().map(|s| s.to_string()).collect(),
        mem_mb: 4096,
        timeout: Duration::from_secs(10),
        verbose: false,
        work: std::env::temp_dir().join(format!("peft-fuzz-{}", std::process::id())),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--cases" => o.cases = val().parse().expect("--cases N"),
            "--first" => o.first = val().parse().expect("--first N"),
            "--seed" => o.seed = val().parse().expect("--seed N"),
            "--kinds" => o.kinds = val().split(',').map(String::from).collect(),
            "--mem-mb" => o.mem_mb = val().parse().expect("--mem-mb N"),
            "--timeout-s" => o.timeout = Duration::from_secs(val().parse().expect("--timeout-s N")),
            "--work" => o.work = PathBuf::from(val()),
            "--verbose" => o.verbose = true,
            // What cargo's test harness passes; this binary has no harness.
            "--nocapture" | "--quiet" | "-q" | "--test-threads" | "--color" => {}
            _ => {}
        }
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2..]);
        return;
    }
    let o = parse_args(&args[1..]);
    parent(&o);
}

/// The child: `--child SEEDS CASE_DIR KIND SEED FIRST END MEM_MB`. Prints `B i` before case i
/// and `E i CLASS description` after it.
fn child(args: &[String]) {
    let seeds = PathBuf::from(&args[0]);
    let case_dir = PathBuf::from(&args[1]);
    let kind = &args[2];
    let seed: u64 = args[3].parse().unwrap();
    let (first, end): (u64, u64) = (args[4].parse().unwrap(), args[5].parse().unwrap());
    let mem_mb: u64 = args[6].parse().unwrap();
    limit_memory(mem_mb);
    // Panics are caught per case and reported; the default hook's message would only be noise.
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        LAST_PANIC.with(|p| *p.borrow_mut() = msg);
    }));
    let mut out = std::io::stdout().lock();
    for i in first..end {
        let mut rng = mutate::Rng::new(seed ^ (i.wrapping_mul(0x2545_F491_4F6C_DD1D)) ^ hash(kind));
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            kinds::prepare(kind, &seeds, &case_dir, &mut rng)
        }));
        let Ok((what, run)) = prepared else {
            // A bug of the fuzzer itself, not of the code under test.
            writeln!(out, "X {i} {}", LAST_PANIC.with(|p| p.borrow().clone())).unwrap();
            std::process::exit(3);
        };
        writeln!(out, "B {i} {what}").unwrap();
        out.flush().unwrap();
        let (class, detail) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(kinds::Used::Fine)) => ("ok", String::new()),
            Ok(Ok(kinds::Used::Absurd(why))) if what.ends_with(kinds::DATA_ONLY) => {
                ("damaged", why)
            }
            Ok(Ok(kinds::Used::Absurd(why))) => ("absurd", why),
            Ok(Err(e)) => {
                let msg = e.to_string();
                // Errors from using a loaded model (an input longer than its context) are about
                // the input; those from loading must name the file.
                if e.during_use || names_a_file(&msg, &case_dir) {
                    ("error", msg)
                } else {
                    ("nameless", msg)
                }
            }
            Err(_) => ("panic", LAST_PANIC.with(|p| p.borrow().clone())),
        };
        let detail: String = detail.replace('\n', " ").chars().take(300).collect();
        writeln!(out, "E {i} {class} {detail}").unwrap();
        out.flush().unwrap();
    }
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// An error about a file must name it: the case directory appears in the message.
fn names_a_file(msg: &str, case_dir: &Path) -> bool {
    msg.contains(&*case_dir.to_string_lossy())
}

fn limit_memory(mb: u64) {
    let bytes = mb * 1024 * 1024;
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit with a valid pointer to a filled struct.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}

#[derive(Default)]
struct Tally {
    counts: BTreeMap<&'static str, u64>,
    /// Up to a few examples per bad class: (case, mutation, detail).
    examples: BTreeMap<&'static str, Vec<(u64, String, String)>>,
}

impl Tally {
    fn add(&mut self, class: &'static str, case: u64, what: &str, detail: &str) {
        *self.counts.entry(class).or_default() += 1;
        if BAD.contains(&class) {
            let ex = self.examples.entry(class).or_default();
            if ex.len() < 8 {
                ex.push((case, what.to_string(), detail.to_string()));
            }
        }
    }
    fn bad(&self) -> u64 {
        BAD.iter()
            .map(|c| self.counts.get(c).copied().unwrap_or(0))
            .sum()
    }
}

fn class_name(s: &str) -> &'static str {
    CLASSES
        .iter()
        .find(|c| **c == s)
        .copied()
        .unwrap_or("crash")
}

fn parent(o: &Options) {
    let started = Instant::now();
    let seeds = o.work.join("seeds");
    kinds::make_seeds(&seeds);
    let exe = std::env::current_exe().unwrap();
    let mut tallies: Vec<(String, Tally, f64)> = vec![];
    for kind in &o.kinds {
        let t0 = Instant::now();
        let mut tally = Tally::default();
        let end = o.first + o.cases;
        let mut next = o.first;
        while next < end {
            let case_dir = o.work.join(format!("case-{kind}"));
            let mut child = Command::new(&exe)
                .arg("--child")
                .arg(&seeds)
                .arg(&case_dir)
                .arg(kind)
                .arg(o.seed.to_string())
                .arg(next.to_string())
                .arg(end.to_string())
                .arg(o.mem_mb.to_string())
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("the fuzzer starts its child");
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut current: Option<(u64, String)> = None;
            loop {
                match rx.recv_timeout(o.timeout) {
                    Ok(line) => {
                        let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
                        let (i, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                        let i: u64 = i.parse().unwrap_or(next);
                        if tag == "X" {
                            panic!("the fuzzer failed to prepare {kind} case {i}: {rest}");
                        }
                        if tag == "B" {
                            current = Some((i, rest.to_string()));
                        } else if tag == "E" {
                            let (class, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                            let what = current.take().map(|c| c.1).unwrap_or_default();
                            let class = class_name(class);
                            if o.verbose {
                                println!("{kind} {i} {class}: {what} => {detail}");
                            }
                            tally.add(class, i, &what, detail);
                            next = i + 1;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        let (i, what) = current.take().unwrap_or((next, String::new()));
                        tally.add("hang", i, &what, &format!("over {:?}", o.timeout));
                        next = i + 1;
                        break;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let status = child.wait().unwrap();
                        if let Some((i, what)) = current.take() {
                            use std::os::unix::process::ExitStatusExt;
                            let (class, detail) = match status.signal() {
                                Some(libc::SIGABRT) => ("abort", "SIGABRT".to_string()),
                                Some(sig) => ("crash", format!("signal {sig}")),
                                None => ("crash", format!("exit {status}")),
                            };
                            if o.verbose {
                                println!("{kind} {i} {class}: {what} => {detail}");
                            }
                            tally.add(class, i, &what, &detail);
                            next = i + 1;
                        } else if next < end {
                            panic!("the fuzzer's child for {kind} stopped before case {next}: {status}");
                        }
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(o.work.join(format!("case-{kind}")));
        tallies.push((kind.clone(), tally, t0.elapsed().as_secs_f64()));
    }
    let _ = std::fs::remove_dir_all(&o.work);
    print_table(&tallies, o, started.elapsed().as_secs_f64());
    let bad: u64 = tallies.iter().map(|(_, t, _)| t.bad()).sum();
    if bad > 0 {
        eprintln!("fuzz_files: {bad} bad outcomes (see the examples above; rerun one with --kinds K --first I --cases 1 --verbose)");
        std::process::exit(1);
    }
}

fn print_table(tallies: &[(String, Tally, f64)], o: &Options, seconds: f64) {
    println!(
        "\nfuzz_files: {} cases per kind from case {}, seed {:#x}, {} MB memory limit, {:?} timeout, {:.0} s",
        o.cases, o.first, o.seed, o.mem_mb, o.timeout, seconds
    );
    print!("{:<12}", "kind");
    for c in CLASSES {
        print!("{c:>9}");
    }
    println!("{:>9}", "cases/s");
    for (kind, t, secs) in tallies {
        print!("{kind:<12}");
        for c in CLASSES {
            print!("{:>9}", t.counts.get(c).copied().unwrap_or(0));
        }
        println!("{:>9.0}", o.cases as f64 / secs.max(1e-9));
    }
    for (kind, t, _) in tallies {
        for (class, ex) in &t.examples {
            for (i, what, detail) in ex {
                println!("  {kind} case {i} {class}: {what} => {detail}");
            }
        }
    }
}
