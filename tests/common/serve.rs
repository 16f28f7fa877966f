//! `downloader serve` started by a test: the whole service in one process.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{eventually, free_port};

/// A running `serve`, killed when dropped.
pub struct Serve {
    child: Child,
    pub port: u16,
    pub http: reqwest::Client,
}

impl Serve {
    /// Starts `serve` in `dir`, with `config` written there unless it is `None`.
    pub async fn start(dir: &Path, config: Option<&Value>) -> Serve {
        downloader::install_crypto_provider();
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_downloader"));
        cmd.current_dir(dir)
            .args(["serve", "--port", &port.to_string()])
            .env("DOWNLOADER_TEST_TIME", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(cfg) = config {
            std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
            cmd.args(["-c", "config.json"]);
        }
        let s = Serve {
            child: cmd.spawn().unwrap(),
            port,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        let url = s.url("/hb");
        let http = s.http.clone();
        eventually(15, "serve to answer /hb", async || {
            http.get(&url).send().await.ok().map(|_| ())
        })
        .await;
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

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
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}
