//! HTTP callbacks: one POST of the JSON payload to the job's `callback_url`, through
//! the callbacks' address guard (`notifier.allowed_networks`), signed as Standard
//! Webhooks when `notifier.signing_secrets` is set.
//!
//! Redirects are not followed: a 3xx answer is a failed attempt (retried like any other
//! non-2xx), as the Standard Webhooks specification recommends. Following one would
//! also let an allowed receiver point the notifier at any address its guard would have
//! to judge again, and would turn a POST into a GET without its body (301, 302, 303).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::CONTENT_TYPE;

use super::delivery::DeliveryError;
use super::signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Signer};
use crate::config::Config;
use crate::errors::error_chain;
use crate::job::{CallbackPayload, JobRecord};
use crate::net::{GuardedResolver, NetGuard, find_refused};

/// Longest a callback's connection (DNS included) may take, within `backends.http.timeout`.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Delivers HTTP callbacks: owns the client (one pool for every receiver), the guard
/// and the signing keys.
pub struct HttpSender {
    client: reqwest::Client,
    guard: Arc<NetGuard>,
    signer: Option<Signer>,
}

impl HttpSender {
    /// From `backends.http.timeout`, `notifier.allowed_networks` and
    /// `notifier.signing_secrets` (validated with the config: errors name the key).
    pub fn new(cfg: &Config) -> anyhow::Result<HttpSender> {
        crate::net::install_crypto_provider();
        let guard = Arc::new(cfg.callback_guard().map_err(anyhow::Error::msg)?);
        let signer =
            Signer::from_config(&cfg.notifier.signing_secrets).map_err(anyhow::Error::msg)?;
        let timeout = Duration::from_secs(cfg.backends.http.timeout);
        let connect = timeout.min(MAX_CONNECT_TIMEOUT);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(connect)
            .no_proxy()
            // Every address a receiver's name resolves to is judged here; IP-literal
            // URLs (which no resolver sees) and localhost names before sending.
            .dns_resolver(Arc::new(GuardedResolver::new(guard.clone(), connect)))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        if let Some(s) = &signer {
            tracing::info!(keys = s.len(), "callbacks are signed (Standard Webhooks)");
        }
        Ok(HttpSender {
            client,
            guard,
            signer,
        })
    }

    /// POSTs `payload` to the job's callback URL. Delivered on any 2xx.
    pub async fn deliver(
        &self,
        job: &JobRecord,
        payload: &CallbackPayload,
    ) -> Result<(), DeliveryError> {
        let permanent = |m: String| DeliveryError::Permanent(m);
        let cb = job
            .spec
            .callback
            .as_ref()
            .ok_or_else(|| permanent("job has no callback destination".into()))?;
        if cb.kind != "http" {
            return Err(permanent(format!(
                "callback type {:?} is not supported by this server (only \"http\")",
                cb.kind
            )));
        }
        let url = url::Url::parse(&cb.dst)
            .map_err(|e| permanent(format!("invalid callback URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(permanent(format!(
                "invalid callback URL: scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        self.guard
            .check_url(&url)
            .map_err(|e| permanent(format!("callback refused: {e}")))?;
        // The exact bytes that are signed are the bytes sent.
        let body = serde_json::to_vec(payload)
            .map_err(|e| permanent(format!("cannot encode the callback: {e}")))?;
        let mut req = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json");
        if let Some(signer) = &self.signer {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            req = req
                .header(HEADER_ID, &job.id)
                .header(HEADER_TIMESTAMP, ts.to_string())
                .header(HEADER_SIGNATURE, signer.signature(&job.id, ts, &body));
        }
        let resp = req.body(body).send().await.map_err(|e| classify(&e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err(DeliveryError::Retry(format!(
                "callback receiver answered status code {}: redirects are not followed \
                 (give the final URL as callback_url)",
                status.as_u16()
            )))
        } else {
            Err(DeliveryError::Retry(format!(
                "callback receiver answered status code {}",
                status.as_u16()
            )))
        }
    }
}

fn classify(e: &reqwest::Error) -> DeliveryError {
    if let Some(r) = find_refused(e) {
        return DeliveryError::Permanent(format!("callback refused: {r}"));
    }
    if e.is_timeout() {
        return DeliveryError::Retry("callback timed out".into());
    }
    if e.is_builder() {
        return DeliveryError::Permanent(format!("callback failed: {}", error_chain(e)));
    }
    DeliveryError::Retry(format!("callback failed: {}", error_chain(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// Every name the client resolves goes through the guard, not only the URL that
    /// `deliver` checks first: a name is refused on its addresses, and nothing connects.
    #[tokio::test]
    async fn the_client_resolves_every_name_through_the_guard() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let server = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                a.fetch_add(1, SeqCst);
                drop(sock);
            }
        });
        let sender = HttpSender::new(&Config::default()).unwrap();
        for host in ["localhost", "localhost.", "x.localhost."] {
            let e = sender
                .client
                .post(format!("http://{host}:{port}/cb"))
                .send()
                .await
                .unwrap_err();
            let refused = find_refused(&e).unwrap_or_else(|| panic!("{host}: {}", error_chain(&e)));
            assert_eq!(refused.key, "notifier.allowed_networks");
            assert!(matches!(classify(&e), DeliveryError::Permanent(_)));
        }
        assert_eq!(accepted.load(SeqCst), 0);
        // With loopback open, the same client reaches it.
        let mut cfg = Config::default();
        cfg.notifier.allowed_networks = Some(vec!["127.0.0.0/8".into()]);
        let sender = HttpSender::new(&cfg).unwrap();
        let _ = sender
            .client
            .post(format!("http://localhost.:{port}/cb"))
            .send()
            .await;
        assert_eq!(accepted.load(SeqCst), 1);
        server.abort();
    }
}
