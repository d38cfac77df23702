//! Files of Hugging Face hub repositories, through the cache Python's huggingface_hub uses
//! (`<cache>/models--org--name/{blobs, snapshots/<commit>, refs/<revision>}`), so files either
//! side downloaded are reused by the other.
//!
//! Downloads run the `curl` command rather than linking an HTTP client: a TLS stack (rustls,
//! ring, ureq, url/idna) was about a seventh of the prelude's first build, which every user
//! pays in the kernel's cache, for a path most CPU sessions never take (issue 20). curl is on
//! every machine that has a hub to reach, and it brings the system's certificates and proxies.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The hub's public address; `HF_ENDPOINT` replaces it (a mirror, or a test server).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where hub files are cached, where they come from, and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The `hub` folder of the Hugging Face cache.
    pub cache_dir: PathBuf,
    /// Never download; a file missing from the cache is an error.
    pub offline: bool,
    /// The hub's address (`HF_ENDPOINT`, default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// Sent as a bearer token for gated and private repositories.
    pub token: Option<String>,
}

impl HubOptions {
    /// The same settings as Python's huggingface_hub: the cache (`HF_HUB_CACHE`, `HF_HOME`),
    /// `HF_HUB_OFFLINE`, `HF_ENDPOINT`, and the token (`HF_TOKEN`, else the file that
    /// `huggingface-cli login` writes).
    pub fn from_env() -> Self {
        let cache_dir = hub_cache_dir();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .or_else(|| std::fs::read_to_string(token_file(&cache_dir)).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        HubOptions {
            cache_dir,
            offline: hub_offline(),
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
        }
    }

    /// These options with another cache folder (the network settings from the environment).
    pub fn with_cache_dir(cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            cache_dir: cache_dir.into(),
            ..Self::from_env()
        }
    }
}

/// The `hub` folder of the Hugging Face cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub` (the same rules as Python's huggingface_hub).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// `huggingface-cli login`'s token file: beside the `hub` folder.
fn token_file(cache_dir: &Path) -> PathBuf {
    cache_dir.parent().unwrap_or(cache_dir).join("token")
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// What kind of repository: the cache folder's prefix and the URL's differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn folder_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }

    fn describe(self, repo: &str) -> String {
        match self {
            RepoKind::Model => repo.to_string(),
            RepoKind::Dataset => format!("dataset {repo}"),
        }
    }
}

/// One repository at one revision (the branch `main`), in the cache.
pub struct HubRepo<'a> {
    options: &'a HubOptions,
    kind: RepoKind,
    id: String,
    revision: String,
}

impl<'a> HubRepo<'a> {
    pub fn new(options: &'a HubOptions, kind: RepoKind, id: &str) -> Self {
        HubRepo {
            options,
            kind,
            id: id.to_string(),
            revision: "main".to_string(),
        }
    }

    /// `<cache>/models--org--name`.
    pub fn folder(&self) -> PathBuf {
        self.options.cache_dir.join(format!(
            "{}--{}",
            self.kind.folder_prefix(),
            self.id.replace('/', "--")
        ))
    }

    /// The cached file of the revision's commit, if it is there.
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        let commit =
            std::fs::read_to_string(self.folder().join("refs").join(&self.revision)).ok()?;
        let path = self
            .folder()
            .join("snapshots")
            .join(commit.trim())
            .join(file);
        path.exists().then_some(path)
    }

    /// The file from the cache, downloaded into it first when missing (unless offline).
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(file) {
            return Ok(path);
        }
        if self.options.offline {
            return Err(Error::Hub(format!(
                "{}: `{file}` is not in the cache at {} and the hub is offline (HF_HUB_OFFLINE)",
                self.kind.describe(&self.id),
                self.options.cache_dir.display()
            )));
        }
        self.download(file).map_err(|failed| failed.error)
    }

    /// [`Self::get`] for a file the repository may not have (the single `model.safetensors` of
    /// a sharded checkpoint, an optional config): `None` when the hub answers 404, or offline
    /// when it is not cached. Any other failure (network, a gated repository) is an error, so
    /// it is not mistaken for the file's absence.
    pub fn get_if_exists(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cached(file) {
            return Ok(Some(path));
        }
        if self.options.offline {
            return Ok(None);
        }
        match self.download(file) {
            Ok(path) => Ok(Some(path)),
            Err(DownloadFailed {
                status: Some(404), ..
            }) => Ok(None),
            Err(failed) => Err(failed.error),
        }
    }

    fn url(&self, file: &str) -> String {
        format!(
            "{}/{}{}/resolve/{}/{}",
            self.options.endpoint.trim_end_matches('/'),
            self.kind.url_prefix(),
            self.id,
            self.revision.replace('/', "%2F"),
            file
        )
    }

    fn hub_error(&self, what: String) -> Error {
        Error::Hub(format!("{}: {what}", self.kind.describe(&self.id)))
    }

    /// Fetches `file` into `blobs/<etag>` (through a temporary file, renamed when complete),
    /// points `snapshots/<commit>/<file>` at it and records the commit in `refs/<revision>`.
    fn download(&self, file: &str) -> std::result::Result<PathBuf, DownloadFailed> {
        let blobs = self.folder().join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| DownloadFailed::from(Error::io(&blobs, e)))?;
        let stamp = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let partial = blobs.join(format!(".{stamp}.incomplete"));
        let headers = blobs.join(format!(".{stamp}.headers"));
        let result = self.fetch(file, &partial, &headers);
        let header_text = std::fs::read_to_string(&headers).unwrap_or_default();
        let _ = std::fs::remove_file(&headers);
        let placed = result.and_then(|()| {
            self.place(file, &partial, &header_text)
                .map_err(DownloadFailed::from)
        });
        let _ = std::fs::remove_file(&partial);
        placed
    }

    /// Runs curl: redirects followed (the hub sends large files to its CDN; curl drops the
    /// token when the host changes), every response's headers kept for [`Self::place`].
    fn fetch(
        &self,
        file: &str,
        partial: &Path,
        headers: &Path,
    ) -> std::result::Result<(), DownloadFailed> {
        let url = self.url(file);
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--show-error", "--location", "--fail"])
            .args(["--retry", "3", "--connect-timeout", "30"])
            .arg("--dump-header")
            .arg(headers)
            .arg("--output")
            .arg(partial)
            .args([
                "--user-agent",
                concat!("peft_prelude/", env!("CARGO_PKG_VERSION")),
            ])
            // The token goes through stdin, not the command line other users can read.
            .args(["--header", "@-"])
            .arg(&url)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            self.hub_error(format!(
                "cannot fetch `{file}`: downloading needs the `curl` command ({e})"
            ))
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            let line = match &self.options.token {
                Some(token) => format!("Authorization: Bearer {token}\n"),
                None => String::new(),
            };
            let _ = stdin.write_all(line.as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|e| self.hub_error(format!("cannot fetch `{file}`: {e}")))?;
        if output.status.success() {
            return Ok(());
        }
        let status = std::fs::read_to_string(headers)
            .ok()
            .and_then(|h| last_status(&h));
        let why = match status {
            Some(401 | 403) => format!(
                "HTTP {} for {url}: the repository is gated or private; accept its terms on the \
                 hub and set HF_TOKEN (or run `huggingface-cli login`)",
                status.unwrap_or_default()
            ),
            Some(404) => format!("no such file or repository ({url}: HTTP 404)"),
            Some(code) => format!("{url}: HTTP {code}"),
            None => format!("{url}: {}", String::from_utf8_lossy(&output.stderr).trim()),
        };
        Err(DownloadFailed {
            status,
            error: self.hub_error(format!("cannot fetch `{file}`: {why}")),
        })
    }

    /// Moves a complete download into the cache layout, named by the hub's headers: the
    /// commit from `X-Repo-Commit`, the blob from `X-Linked-Etag` (large files) or `ETag`.
    fn place(&self, file: &str, partial: &Path, headers: &str) -> Result<PathBuf> {
        let meta = HubHeaders::parse(headers).ok_or_else(|| {
            self.hub_error(format!(
                "cannot fetch `{file}`: {} did not answer as a hub does (no X-Repo-Commit and \
                 ETag headers)",
                self.options.endpoint
            ))
        })?;
        let folder = self.folder();
        let blob = folder.join("blobs").join(&meta.etag);
        std::fs::rename(partial, &blob).map_err(|e| Error::io(&blob, e))?;
        let pointer = folder.join("snapshots").join(&meta.commit).join(file);
        let parent = pointer.parent().unwrap_or(&folder);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        link_into_snapshot(&blob, &pointer, file)?;
        let refs = folder.join("refs").join(&self.revision);
        let refs_dir = refs.parent().unwrap_or(&folder);
        std::fs::create_dir_all(refs_dir).map_err(|e| Error::io(refs_dir, e))?;
        crate::peft::io::write_atomic(&refs, meta.commit.as_bytes())?;
        Ok(pointer)
    }
}

/// A failed download, with the HTTP status when the server answered (404: no such file).
struct DownloadFailed {
    status: Option<u16>,
    error: Error,
}

impl From<Error> for DownloadFailed {
    fn from(error: Error) -> Self {
        DownloadFailed {
            status: None,
            error,
        }
    }
}

/// The snapshot entry: a relative symlink to the blob, as huggingface_hub makes it.
fn link_into_snapshot(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    let depth = file.split('/').count() - 1;
    let mut target = PathBuf::from("../..");
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    let _ = std::fs::remove_file(pointer);
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(&target, pointer);
    #[cfg(not(unix))]
    let linked = std::fs::copy(blob, pointer).map(|_| ());
    linked.map_err(|e| Error::io(pointer, e))
}

/// The metadata the cache layout needs, from curl's dump of every response's headers.
#[derive(Debug, PartialEq, Eq)]
struct HubHeaders {
    commit: String,
    etag: String,
}

impl HubHeaders {
    /// The first response that carries `X-Repo-Commit` is the hub's own (later ones are its
    /// CDN's); its etag names the blob, without quotes or a weak `W/` prefix.
    fn parse(dump: &str) -> Option<Self> {
        for response in responses(dump) {
            let header = |name: &str| {
                response.iter().find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_string())
                })
            };
            let Some(commit) = header("x-repo-commit") else {
                continue;
            };
            let etag = header("x-linked-etag").or_else(|| header("etag"))?;
            let etag = etag.trim_start_matches("W/").replace('"', "");
            let safe = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            return (safe(&commit) && safe(&etag)).then_some(HubHeaders { commit, etag });
        }
        None
    }
}

/// curl's header dump split into responses (each starts with its status line).
fn responses(dump: &str) -> Vec<Vec<&str>> {
    let mut out: Vec<Vec<&str>> = Vec::new();
    for line in dump.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            out.push(vec![line]);
        } else if let Some(current) = out.last_mut() {
            if !line.is_empty() {
                current.push(line);
            }
        }
    }
    out
}

/// The status code of the last response in a header dump.
fn last_status(dump: &str) -> Option<u16> {
    responses(dump)
        .last()?
        .first()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_response_names_the_blob_not_the_cdn_response() {
        let dump = "HTTP/1.1 302 Found\r\nX-Repo-Commit: abc123\r\nX-Linked-Etag: \"deadbeef\"\r\nETag: W/\"xyz\"\r\nLocation: https://cdn/x\r\n\r\nHTTP/1.1 200 OK\r\nETag: \"other\"\r\n\r\n";
        assert_eq!(
            HubHeaders::parse(dump),
            Some(HubHeaders {
                commit: "abc123".into(),
                etag: "deadbeef".into()
            })
        );
        assert_eq!(last_status(dump), Some(200));
        let small = "HTTP/2 200\r\nx-repo-commit: c0ffee\r\netag: W/\"12-ab\"\r\n\r\n";
        assert_eq!(HubHeaders::parse(small).unwrap().etag, "12-ab");
        assert_eq!(
            HubHeaders::parse("HTTP/1.1 200 OK\r\nETag: \"a\"\r\n\r\n"),
            None
        );
        // A header value that would escape the cache folder is refused.
        let evil = "HTTP/1.1 200 OK\r\nX-Repo-Commit: ../../x\r\nETag: \"a\"\r\n\r\n";
        assert_eq!(HubHeaders::parse(evil), None);
    }
}
