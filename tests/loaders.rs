//! Loaders beyond the single-file directory: the Hugging Face hub cache (offline), sharded
//! checkpoints, and GGUF files this crate must refuse with a clear error.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use peft_prelude::data::Dataset;
use peft_prelude::model::{HubOptions, LoadOptions, Pretrained};
use peft_prelude::Error;
use peft_tests::fixture;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-loaders-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn reference_logits() -> Tensor {
    let p = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    p.model.forward(&ids).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Lays out tiny-mistral the way huggingface_hub caches a repo:
/// `models--org--name/{refs/main, snapshots/<rev>/<files>}`.
fn fake_hub_cache(repo: &str) -> PathBuf {
    let cache = scratch("hub");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(rev);
    fs::create_dir_all(&snapshot).unwrap();
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), rev).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        fs::copy(fixture("tiny-mistral").join(f), snapshot.join(f)).unwrap();
    }
    cache
}

#[test]
fn hub_repo_from_the_cache_offline() {
    let cache = fake_hub_cache("test-org/tiny-mistral");
    let hub = HubOptions {
        offline: true,
        ..HubOptions::with_cache_dir(&cache)
    };
    let p =
        Pretrained::from_hub_with("test-org/tiny-mistral", &hub, &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&p.model.forward(&ids).unwrap(), &reference_logits()),
        0.0
    );
    assert_eq!(p.generation_config.eos_token_ids, vec![2]);

    let err = Pretrained::from_hub_with("test-org/not-cached", &hub, &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("test-org/not-cached") && msg.contains("offline"),
        "{msg}"
    );
    fs::remove_dir_all(cache).unwrap();
}

/// A stand-in for the hub on a local port, answering as huggingface.co does: small files
/// with `X-Repo-Commit` and a weak `ETag`; large ones (the weights) as a redirect to a CDN
/// path carrying `X-Linked-Etag`; a gated repository only with the right bearer token.
struct FakeHub {
    endpoint: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

const FAKE_COMMIT: &str = "c0ffee0000000000000000000000000000000001";
const FAKE_TOKEN: &str = "hf_test_secret";

impl FakeHub {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let base = endpoint.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut authorized = false;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
                        break;
                    }
                    authorized |= line
                        .trim()
                        .eq_ignore_ascii_case(&format!("authorization: Bearer {FAKE_TOKEN}"));
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                seen.lock().unwrap().push(path.clone());
                let (status, headers, body) = Self::answer(&base, &path, authorized);
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        FakeHub { endpoint, requests }
    }

    fn answer(
        base: &str,
        path: &str,
        authorized: bool,
    ) -> (&'static str, Vec<(String, String)>, Vec<u8>) {
        let hub = |etag: String| {
            vec![
                ("X-Repo-Commit".to_string(), FAKE_COMMIT.to_string()),
                ("ETag".to_string(), etag),
            ]
        };
        if let Some(file) = path.strip_prefix("/cdn/") {
            let body = fs::read(fixture("tiny-mistral").join(file)).unwrap();
            return ("200 OK", vec![("ETag".into(), "\"cdn-etag\"".into())], body);
        }
        let (repo, file) = match path.split_once("/resolve/main/") {
            Some(parts) => parts,
            None => return ("404 Not Found", vec![], b"not found".to_vec()),
        };
        if repo == "/test-org/broken-mistral" && file == "model.safetensors" {
            // A failure that is not "no such file" (curl does not retry a 410).
            return ("410 Gone", hub("\"gone\"".into()), b"gone".to_vec());
        }
        match repo {
            "/test-org/tiny-mistral" | "/test-org/gated-mistral" | "/test-org/broken-mistral" => {
                if repo.contains("gated") && !authorized {
                    return ("401 Unauthorized", vec![], b"gated".to_vec());
                }
                let Ok(body) = fs::read(fixture("tiny-mistral").join(file)) else {
                    return (
                        "404 Not Found",
                        hub("\"none\"".into()),
                        b"entry not found".to_vec(),
                    );
                };
                if file == "model.safetensors" {
                    let mut headers = hub("\"ignored\"".into());
                    headers.push(("X-Linked-Etag".into(), "\"5eed5afe7e2050f\"".into()));
                    headers.push(("Location".into(), format!("{base}/cdn/{file}")));
                    ("302 Found", headers, vec![])
                } else {
                    (
                        "200 OK",
                        hub(format!("W/\"{}-{}\"", body.len(), file.len())),
                        body,
                    )
                }
            }
            "/datasets/test-org/moods" if file == "train.jsonl" => (
                "200 OK",
                hub("W/\"moods\"".into()),
                b"{\"instruction\": \"Label\", \"input\": \"great\", \"output\": \"positive\"}\n"
                    .to_vec(),
            ),
            _ => ("404 Not Found", vec![], b"repository not found".to_vec()),
        }
    }

    fn options(&self, cache: &std::path::Path, token: Option<&str>) -> HubOptions {
        HubOptions {
            cache_dir: cache.to_path_buf(),
            offline: false,
            endpoint: self.endpoint.clone(),
            token: token.map(str::to_string),
        }
    }

    fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

/// What a user does on a machine with a network: load a hub repository that is not cached.
/// The files land in huggingface_hub's layout (blobs named by etag, a relative symlink per
/// file in the commit's snapshot, refs/main), and a second load touches no network.
#[test]
fn hub_repo_downloaded_into_the_shared_cache() {
    let hub = FakeHub::start();
    let cache = scratch("hub-download");
    let options = hub.options(&cache, None);
    let p = Pretrained::from_hub_with("test-org/tiny-mistral", &options, &LoadOptions::default())
        .unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&p.model.forward(&ids).unwrap(), &reference_logits()),
        0.0
    );
    let repo = cache.join("models--test-org--tiny-mistral");
    assert_eq!(
        fs::read_to_string(repo.join("refs/main")).unwrap(),
        FAKE_COMMIT
    );
    let weights = repo
        .join("snapshots")
        .join(FAKE_COMMIT)
        .join("model.safetensors");
    assert_eq!(
        fs::read_link(&weights).unwrap(),
        PathBuf::from("../../blobs/5eed5afe7e2050f")
    );
    assert_eq!(
        fs::read(&weights).unwrap(),
        fs::read(fixture("tiny-mistral/model.safetensors")).unwrap()
    );
    let blobs: Vec<String> = fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| !b.starts_with('.')),
        "temporary files left: {blobs:?}"
    );
    assert!(hub
        .requests
        .lock()
        .unwrap()
        .contains(&"/cdn/model.safetensors".to_string()));

    let before = hub.request_count();
    Pretrained::from_hub_with("test-org/tiny-mistral", &options, &LoadOptions::default()).unwrap();
    assert_eq!(
        hub.request_count(),
        before,
        "a cached repository was fetched again"
    );

    // A dataset repository: its own folder prefix and URL.
    let data = Dataset::from_hub_with("test-org/moods", "train.jsonl", &options).unwrap();
    assert_eq!(data.len(), 1);
    assert!(cache.join("datasets--test-org--moods/refs/main").is_file());
    fs::remove_dir_all(cache).unwrap();
}

#[test]
fn hub_errors_name_the_repository_and_what_to_do() {
    let hub = FakeHub::start();
    let cache = scratch("hub-errors");

    // Gated: refused without the token, with a hint; loaded with it.
    let err = Pretrained::from_hub_with(
        "test-org/gated-mistral",
        &hub.options(&cache, None),
        &LoadOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    assert!(
        msg.contains("test-org/gated-mistral") && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    Pretrained::from_hub_with(
        "test-org/gated-mistral",
        &hub.options(&cache, Some(FAKE_TOKEN)),
        &LoadOptions::default(),
    )
    .unwrap();

    // The weights fail for another reason than absence: that error, not the sharded index's
    // 404 that trying the index next would give.
    let err = Pretrained::from_hub_with(
        "test-org/broken-mistral",
        &hub.options(&cache, None),
        &LoadOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("410") && !msg.contains("index"),
        "{msg}"
    );

    // Missing repository or file.
    let err = Dataset::from_hub_with("test-org/none", "train.json", &hub.options(&cache, None))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("dataset test-org/none") && msg.contains("train.json") && msg.contains("404"),
        "{msg}"
    );

    // Nothing listening: an error, not a hang or a panic, and no partial file in the cache.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = HubOptions {
        endpoint: format!("http://{}", closed.local_addr().unwrap()),
        ..hub.options(&cache, None)
    };
    drop(closed);
    let err =
        Pretrained::from_hub_with("test-org/other", &dead, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Hub(_)) && err.to_string().contains("test-org/other"),
        "{err}"
    );
    let leftovers: Vec<_> = fs::read_dir(cache.join("models--test-org--other/blobs"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    fs::remove_dir_all(cache).unwrap();
}

#[test]
fn sharded_checkpoint_with_index() {
    let dir = scratch("sharded");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixture("tiny-mistral").join(f), dir.join(f)).unwrap();
    }
    let all =
        candle_core::safetensors::load(fixture("tiny-mistral/model.safetensors"), &Device::Cpu)
            .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, t) in all {
        let shard = if name.contains("layers.1") || name.starts_with("lm_head") {
            b.insert(name.clone(), t);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(name.clone(), t);
            "model-00001-of-00002.safetensors"
        };
        weight_map.insert(name, shard.into());
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let p = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[1u32, 415, 2936, 9060, 285, 1142]], &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&p.model.forward(&ids).unwrap(), &reference_logits()),
        0.0
    );

    // A shard that the index lists but that is missing is named in the error.
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Pretrained::from_dir(&dir, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("missing"),
        "{msg}"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// Copies a fixture GGUF with changed metadata and/or one tensor re-typed.
fn rewrite_gguf(
    path: &PathBuf,
    set: &[(&str, gguf_file::Value)],
    retype: Option<(&str, GgmlDType)>,
) {
    let src = fixture("gguf/tiny-mistral-f32.gguf");
    let mut file = fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata: Vec<(String, gguf_file::Value)> =
        content.metadata.clone().into_iter().collect();
    for (k, v) in set {
        metadata.retain(|(key, _)| key != k);
        metadata.push((k.to_string(), v.clone()));
    }
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let t = match retype {
            Some((n, dtype)) if n == name => {
                QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dtype).unwrap()
            }
            _ => t,
        };
        tensors.push((name.clone(), t));
    }
    let mut out = fs::File::create(path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &md, &ts).unwrap();
}

#[test]
fn gguf_of_another_architecture_is_refused() {
    let dir = scratch("gguf-arch");
    let path = dir.join("falcon.gguf");
    rewrite_gguf(
        &path,
        &[(
            "general.architecture",
            gguf_file::Value::String("falcon".into()),
        )],
        None,
    );
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("falcon"),
        "{msg}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gguf_with_an_unsupported_tensor_type_is_refused() {
    let dir = scratch("gguf-type");
    let path = dir.join("q2k.gguf");
    // Q8_1 (32-element blocks fit the 64-wide rows) is a real GGML type this loader does not read.
    rewrite_gguf(&path, &[], Some(("blk.0.ffn_up.weight", GgmlDType::Q8_1)));
    let err = Pretrained::from_gguf(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.ffn_up.weight") && msg.contains("Q8_1"),
        "{msg}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gguf_and_safetensors_agree_on_the_same_weights() {
    // The F32 GGUF run with the window removed equals the safetensors model without window:
    // the q/k un-permutation and the name mapping are exact.
    let mut st = Pretrained::from_dir(fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    st.model.set_sliding_window(None);
    let gguf = Pretrained::from_gguf(
        fixture("gguf/tiny-mistral-f32.gguf"),
        &LoadOptions::default(),
    )
    .unwrap();
    let ids = Tensor::new(
        &[[1u32, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272]],
        &Device::Cpu,
    )
    .unwrap();
    let d = max_diff(
        &st.model.forward(&ids).unwrap(),
        &gguf.model.forward(&ids).unwrap(),
    );
    assert!(d < 1e-5, "{d}");
    assert_eq!(st.model.config().vocab_size, gguf.model.config().vocab_size);
}
