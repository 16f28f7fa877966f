//! Test harness: the real `downloader` binary's components against a real Redis, a
//! local origin server and a local callback receiver, each test under its own key
//! prefix and storage directory.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

pub mod serve;

pub const REDIS_ADDR: &str = "127.0.0.1:6379";

/// Fails (never skips) when no Redis answers, saying how to start one.
pub fn require_redis() -> redis::Client {
    let client = redis::Client::open(format!("redis://{REDIS_ADDR}/")).unwrap();
    match client.get_connection_with_timeout(Duration::from_secs(2)) {
        Ok(mut c) => {
            let pong: String = redis::cmd("PING").query(&mut c).expect("Redis PING");
            assert_eq!(pong, "PONG");
            client
        }
        Err(e) => panic!(
            "these tests need Redis on {REDIS_ADDR} ({e}); start one with:\n  \
             redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
        ),
    }
}

/// Polls `f` until it returns `Some`, failing the test after `secs`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- origin server

#[derive(Default)]
pub struct OriginState {
    /// Requests per path.
    pub hits: Mutex<HashMap<String, u32>>,
    /// Headers of the last request per path.
    pub headers: Mutex<HashMap<String, HeaderMap>>,
    /// Per aggregation: (in flight now, most ever in flight).
    pub concurrency: Mutex<HashMap<String, (u32, u32)>>,
    pub files: Mutex<HashMap<String, Vec<u8>>>,
    /// When each request arrived, per path.
    pub times: Mutex<HashMap<String, Vec<Instant>>>,
}

pub struct Origin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
}

impl Origin {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn hits(&self, path: &str) -> u32 {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
    pub fn times(&self, path: &str) -> Vec<Instant> {
        self.state
            .times
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
    /// Arrival times of every request, whatever the path, in order.
    pub fn all_times(&self) -> Vec<Instant> {
        let mut all: Vec<Instant> = self
            .state
            .times
            .lock()
            .unwrap()
            .values()
            .flatten()
            .copied()
            .collect();
        all.sort();
        all
    }
    pub fn max_concurrency(&self, aggr: &str) -> u32 {
        self.state
            .concurrency
            .lock()
            .unwrap()
            .get(aggr)
            .map_or(0, |c| c.1)
    }
    pub fn add_file(&self, name: &str, bytes: Vec<u8>) {
        self.state.files.lock().unwrap().insert(name.into(), bytes);
    }
    pub fn last_headers(&self, path: &str) -> HeaderMap {
        self.state
            .headers
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

fn count(s: &OriginState, path: &str, headers: &HeaderMap) -> u32 {
    s.headers
        .lock()
        .unwrap()
        .insert(path.to_string(), headers.clone());
    s.times
        .lock()
        .unwrap()
        .entry(path.to_string())
        .or_default()
        .push(Instant::now());
    let mut hits = s.hits.lock().unwrap();
    let n = hits.entry(path.to_string()).or_default();
    *n += 1;
    *n
}

pub async fn start_origin() -> Origin {
    let state = Arc::new(OriginState::default());
    let app = Router::new()
        .route("/file/{name}", get(file))
        .route("/status/{code}", get(status))
        .route("/flaky/{fails}/{key}", get(flaky))
        .route("/slow/{ms}", get(slow))
        .route("/ratelimited/{n}/{key}", get(ratelimited))
        .route("/pause/{secs}/{n}/{key}", get(pause))
        .route("/aggr/{aggr}/{n}", get(aggr))
        .route("/redirect", get(redirect))
        .route("/via-localhost/{*rest}", get(via_localhost))
        .with_state(state.clone());
    Origin {
        addr: serve_local(app).await,
        state,
    }
}

/// Serves `app` on a free loopback port for the rest of the test.
pub async fn serve_local(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn file(
    State(s): State<Arc<OriginState>>,
    UrlPath(name): UrlPath<String>,
    h: HeaderMap,
) -> Response {
    count(&s, &format!("/file/{name}"), &h);
    match s.files.lock().unwrap().get(&name) {
        Some(b) => b.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn status(
    State(s): State<Arc<OriginState>>,
    UrlPath(code): UrlPath<u16>,
    h: HeaderMap,
) -> Response {
    count(&s, &format!("/status/{code}"), &h);
    let mut r = StatusCode::from_u16(code).unwrap().into_response();
    if code == 429 || code == 503 {
        r.headers_mut().insert("retry-after", "0".parse().unwrap());
    }
    r
}

async fn flaky(
    State(s): State<Arc<OriginState>>,
    UrlPath((fails, key)): UrlPath<(u32, String)>,
    h: HeaderMap,
) -> Response {
    let n = count(&s, &format!("/flaky/{fails}/{key}"), &h);
    if n <= fails {
        (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response()
    } else {
        format!("ok after {n}").into_response()
    }
}

/// Answers 429 with `Retry-After: 1` to the first `n` requests.
async fn ratelimited(
    State(s): State<Arc<OriginState>>,
    UrlPath((n, key)): UrlPath<(u32, String)>,
    h: HeaderMap,
) -> Response {
    if count(&s, &format!("/ratelimited/{n}/{key}"), &h) <= n {
        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
    } else {
        "ok".into_response()
    }
}

/// 429 with `Retry-After: secs` for the first `n` requests, then a file.
async fn pause(
    State(s): State<Arc<OriginState>>,
    UrlPath((secs, n, key)): UrlPath<(u32, u32, String)>,
    h: HeaderMap,
) -> Response {
    if count(&s, &format!("/pause/{secs}/{n}/{key}"), &h) <= n {
        let after = secs.to_string();
        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", after)]).into_response()
    } else {
        "ok".into_response()
    }
}

async fn slow(
    State(s): State<Arc<OriginState>>,
    UrlPath(ms): UrlPath<u64>,
    h: HeaderMap,
) -> Response {
    count(&s, &format!("/slow/{ms}"), &h);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "finally".into_response()
}

async fn redirect(State(s): State<Arc<OriginState>>, h: HeaderMap) -> Response {
    count(&s, "/redirect", &h);
    (
        StatusCode::FOUND,
        [("location", "http://169.254.169.254/latest/meta-data/")],
    )
        .into_response()
}

/// Redirects to the same path on `localhost` (another host name for this server).
async fn via_localhost(
    State(s): State<Arc<OriginState>>,
    UrlPath(rest): UrlPath<String>,
    h: HeaderMap,
) -> Response {
    count(&s, &format!("/via-localhost/{rest}"), &h);
    let port = h
        .get("host")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(':').next())
        .unwrap_or_default()
        .to_string();
    let to = format!("http://localhost:{port}/{rest}");
    (StatusCode::FOUND, [("location", to)]).into_response()
}

/// Holds each request a little while, recording concurrency per aggregation.
async fn aggr(
    State(s): State<Arc<OriginState>>,
    UrlPath((aggr, n)): UrlPath<(String, u32)>,
    h: HeaderMap,
) -> Response {
    count(&s, &format!("/aggr/{aggr}/{n}"), &h);
    {
        let mut c = s.concurrency.lock().unwrap();
        let e = c.entry(aggr.clone()).or_default();
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }
    // Decrements on drop too: a killed client makes the server drop this future.
    struct Leave(Arc<OriginState>, String);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0
                .concurrency
                .lock()
                .unwrap()
                .get_mut(&self.1)
                .unwrap()
                .0 -= 1;
        }
    }
    let _leave = Leave(s.clone(), aggr.clone());
    tokio::time::sleep(Duration::from_millis(15)).await;
    format!("{aggr}/{n}").into_response()
}

/// A server that promises 1000 bytes and sends 5.
pub async fn start_truncating_origin() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nshort")
                    .await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

// ------------------------------------------------------------ callback receiver

#[derive(Default)]
pub struct ReceiverState {
    pub callbacks: Mutex<Vec<Value>>,
    /// Requests per path, including failed ones.
    pub hits: Mutex<HashMap<String, u32>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub state: Arc<ReceiverState>,
}

impl Receiver {
    /// A URL whose first `fails` callbacks answer 500.
    pub fn url(&self, fails: u32) -> String {
        format!(
            "http://{}/cb/{fails}/{}",
            self.addr,
            downloader::job::new_id()
        )
    }
    pub fn callbacks(&self) -> Vec<Value> {
        self.state.callbacks.lock().unwrap().clone()
    }
    pub fn for_job(&self, id: &str) -> Vec<Value> {
        self.callbacks()
            .into_iter()
            .filter(|c| c["job_id"] == id)
            .collect()
    }
    pub async fn wait_for(&self, id: &str, secs: u64) -> Value {
        eventually(secs, &format!("callback of job {id}"), async || {
            self.for_job(id).into_iter().next()
        })
        .await
    }
    pub fn hits(&self, url: &str) -> u32 {
        let path = url.split_once(&self.addr.to_string()).unwrap().1;
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

pub async fn start_receiver() -> Receiver {
    let state = Arc::new(ReceiverState::default());
    let app = Router::new()
        .route("/cb/{fails}/{key}", post(receive))
        .with_state(state.clone());
    Receiver {
        addr: serve_local(app).await,
        state,
    }
}

async fn receive(
    State(s): State<Arc<ReceiverState>>,
    UrlPath((fails, key)): UrlPath<(u32, String)>,
    body: axum::Json<Value>,
) -> StatusCode {
    let n = {
        let mut hits = s.hits.lock().unwrap();
        let n = hits.entry(format!("/cb/{fails}/{key}")).or_default();
        *n += 1;
        *n
    };
    if n <= fails {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    s.callbacks.lock().unwrap().push(body.0);
    StatusCode::OK
}

// ------------------------------------------------------------------ the service

pub struct Service {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub config: PathBuf,
    pub web_addr: SocketAddr,
    pub procs: HashMap<String, Child>,
    logs: Arc<Mutex<Vec<String>>>,
    redis: redis::Client,
    pub http: reqwest::Client,
}

/// Config for a test; `extra` is merged over it section by section.
pub fn base_config(dir: &Path, prefix: &str, extra: Value) -> Value {
    let mut cfg = json!({
        "redis": {"addr": REDIS_ADDR, "key_prefix": prefix},
        "api": {"heartbeat_path": dir.join("disable_api")},
        "processor": {
            "storage_dir": dir.join("files"),
            "download_url": "http://files.test/dl",
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "stats_interval": 200,
            "lease_secs": 4,
            "shutdown_grace_secs": 5
        },
        // Callback receivers are on loopback, which callbacks may not reach by default.
        "notifier": {"concurrency": 10, "stats_interval": 200, "deletion_interval": 60, "lease_secs": 4,
                     "allowed_networks": ["127.0.0.0/8", "::1/128"]},
        "backends": {"http": {"timeout": 5}}
    });
    if let Value::Object(extra) = extra {
        for (section, v) in extra {
            match (cfg.get_mut(&section), v) {
                (Some(Value::Object(base)), Value::Object(over)) => {
                    for (k, v) in over {
                        if v.is_null() {
                            base.remove(&k);
                        } else {
                            base.insert(k, v);
                        }
                    }
                }
                (_, v) => {
                    cfg[&section] = v;
                }
            }
        }
    }
    cfg
}

impl Service {
    /// Starts `web`, `processor` and `notifier` with a fresh prefix.
    pub async fn start(extra: Value) -> Service {
        Self::start_with(extra, &["processor", "notifier"]).await
    }

    pub async fn start_with(extra: Value, components: &[&str]) -> Service {
        let redis = require_redis();
        downloader::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("test:{}", downloader::job::new_id());
        let cfg = base_config(dir.path(), &prefix, extra);
        let config = dir.path().join("config.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let port = free_port();
        let mut s = Service {
            web_addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
            prefix,
            config,
            procs: HashMap::new(),
            logs: Arc::new(Mutex::new(Vec::new())),
            redis,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        s.spawn(
            "web",
            &["web", "--host", "127.0.0.1", "--port", &port.to_string()],
        );
        for c in components {
            s.spawn(c, &[c]);
        }
        let url = s.url("/hb");
        let http = s.http.clone();
        eventually(15, "web to answer /hb", async || {
            http.get(&url).send().await.ok().map(|_| ())
        })
        .await;
        s
    }

    /// This service's Redis keys matching `pattern` (after its prefix) with their
    /// time to live in ms (-1: none).
    pub fn keys_with_ttl(&self, pattern: &str) -> Vec<(String, i64)> {
        let mut conn = self
            .redis
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:{pattern}", self.prefix))
            .query(&mut conn)
            .unwrap();
        keys.into_iter()
            .map(|k| {
                let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut conn).unwrap();
                (k, ttl)
            })
            .collect()
    }

    /// The binary with this service's config and test environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_downloader"));
        cmd.args(args)
            .arg("-c")
            .arg(&self.config)
            .env("DOWNLOADER_TEST_TIME", "1")
            // Accepted connections are logged at debug: tests wait on them.
            .env("DOWNLOADER_LOG", "info,downloader::web::server=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `cmd` as component `name`, collecting its log lines.
    fn run_component(&mut self, name: &str, mut cmd: Command) {
        let mut child = cmd.spawn().expect("start downloader binary");
        if let Some(err) = child.stderr.take() {
            let logs = self.logs.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(format!("[{tag}] {line}"));
                }
            });
        }
        if let Some(mut old) = self.procs.insert(name.to_string(), child) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    /// Starts a component under `name` (e.g. "processor-2").
    pub fn spawn(&mut self, name: &str, args: &[&str]) {
        let cmd = self.command(args);
        self.run_component(name, cmd);
    }

    /// This service's config as JSON (to derive another one from).
    pub fn config_json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.config).unwrap()).unwrap()
    }

    /// Starts a component under `name` with its own config `cfg` (written beside the
    /// service's): a component whose config differs from web's, as after an upgrade.
    pub fn spawn_with_config(&mut self, name: &str, args: &[&str], cfg: &Value) {
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(cfg).unwrap()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_downloader"));
        cmd.args(args)
            .arg("-c")
            .arg(&path)
            .env("DOWNLOADER_TEST_TIME", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run_component(name, cmd);
    }

    /// Runs the binary to its end with this service's config (`-c` is added after
    /// `args`); returns its exit code, stdout and stderr.
    pub fn run_cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_downloader"));
        cmd.args(args).arg("-c").arg(&self.config);
        run_to_end(cmd, Duration::from_secs(120))
    }

    /// Starts a component whose stderr is a pipe with no reader: every log line
    /// meets EPIPE.
    pub fn spawn_with_broken_stderr(&mut self, name: &str, args: &[&str]) {
        let mut cmd = self.command(args);
        cmd.env("DOWNLOADER_LOG", "debug").stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("start downloader binary");
        drop(child.stderr.take());
        drop(child.stdout.take());
        self.procs.insert(name.to_string(), child);
    }

    /// Starts a component as systemd socket activation would: `listener` as fd 3 and
    /// `LISTEN_FDS=1`.
    pub fn spawn_activated(&mut self, name: &str, args: &[&str], listener: &std::net::TcpListener) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = listener.as_raw_fd();
        let mut cmd = self.command(args);
        cmd.env("LISTEN_FDS", "1");
        // SAFETY: dup2 and fcntl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let r = if fd == 3 {
                    fcntl(3, 2 /* F_SETFD */, 0)
                } else {
                    dup2(fd, 3)
                };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
        self.run_component(name, cmd);
    }

    /// Whether the component is still running.
    pub fn alive(&mut self, name: &str) -> bool {
        self.procs
            .get_mut(name)
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn sigkill(&mut self, name: &str) {
        let mut c = self.procs.remove(name).expect("component running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Sends signal `sig` to a running component.
    pub fn signal(&mut self, name: &str, sig: i32) {
        let pid = self.procs.get(name).expect("component running").id();
        unsafe { libc_kill(pid as i32, sig) };
    }

    /// SIGTERM, then waits for the exit status (with a deadline).
    pub fn sigterm(&mut self, name: &str) -> std::process::ExitStatus {
        let mut c = self.procs.remove(name).expect("component running");
        unsafe { libc_kill(c.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.web_addr)
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// POSTs a job, asserting 201; returns its id.
    pub async fn submit(&self, job: Value) -> String {
        let r = self
            .http
            .post(self.url("/download"))
            .json(&job)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "submit {job}: {body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn job(&self, id: &str) -> Value {
        let (st, v) = self.get(&format!("/jobs/{id}")).await;
        assert_eq!(st, 200, "{v}");
        v
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for (_, c) in self.procs.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- service logs ----\n{}", self.logs());
        }
        // Remove this test's keys only; never touch other tests' or anyone's data.
        if let Ok(mut c) = self
            .redis
            .get_connection_with_timeout(Duration::from_secs(2))
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.prefix))
                .query(&mut c)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut c);
            }
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn fcntl(fd: i32, cmd: i32, arg: i32) -> i32;
}

/// Runs `cmd` (no stdin) until it exits, killing it after `deadline`; returns its
/// exit code, stdout and stderr.
pub fn run_to_end(mut cmd: Command, deadline: Duration) -> (i32, String, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start downloader binary");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A job body for the origin's path with a fresh callback URL.
pub fn job(origin: &Origin, path: &str, cb: &str, aggr: &str, limit: u32) -> Value {
    json!({
        "aggr_id": aggr,
        "aggr_limit": limit,
        "url": origin.url(path),
        "callback_url": cb,
    })
}

// ---------------------------------------------------------------------- metrics

/// GETs `url` (a `/metrics` endpoint) on a fresh connection and returns the text.
pub async fn scrape(url: &str) -> String {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    r.text().await.unwrap()
}

/// The value of one series (`name` or `name{label="v"}`) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
