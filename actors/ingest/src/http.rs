//! GET with retries for the market-data APIs (Alpaca, FRED).
//!
//! - `429 Too Many Requests` and `5xx` answers, and requests that fail to
//!   connect or break off, are retried: the wait is the server's
//!   `Retry-After` when it sends one (capped at [`RetryPolicy::max_wait`]),
//!   else exponential backoff from [`RetryPolicy::base`] with full jitter.
//! - Any other non-2xx answer is an error at once, naming the API, the
//!   status and the start of the error body (never the credentials).
//! - Every retry is logged with its reason, and the caller learns how many
//!   there were.

use std::time::Duration;

use reqwest::{RequestBuilder, StatusCode};
use tickmesh_core::{Error, Result};
use tracing::warn;

/// How a request is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The first backoff; it doubles per retry.
    pub base: Duration,
    /// The longest single wait.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            base: Duration::from_millis(500),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// The body of a successful GET, and how many retries it took.
pub struct Fetched {
    pub body: bytes::Bytes,
    pub retries: u32,
}

/// The most of an error body quoted in an error.
const ERROR_BODY_QUOTE: usize = 300;

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(ERROR_BODY_QUOTE) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Sends the request built by `build` until it succeeds, retrying as the
/// module says. `api` names the service in errors and logs (`alpaca`,
/// `fred`); `what` names the request (without secrets).
pub async fn get_retrying(
    api: &'static str,
    what: &str,
    policy: RetryPolicy,
    build: impl Fn() -> RequestBuilder,
) -> Result<Fetched> {
    let mut retries = 0u32;
    loop {
        let last = retries + 1 >= policy.attempts;
        let (reason, retry_after) = match build().send().await {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = resp.bytes().await;
                match (status, body) {
                    (s, Ok(body)) if s.is_success() => return Ok(Fetched { body, retries }),
                    (s, Ok(body)) if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                        (format!("{s}: {}", quote(&body)), retry_after)
                    }
                    (s, Ok(body)) => {
                        return Err(Error::invalid(
                            api,
                            format!("{what}: the server answered {s}: {}", quote(&body)),
                        ))
                    }
                    (s, Err(e)) => (
                        format!("{s}, and the body broke off: {}", describe(e)),
                        None,
                    ),
                }
            }
            Err(e) => (format!("request failed: {}", describe(e)), None),
        };
        if last {
            return Err(Error::invalid(
                api,
                format!(
                    "{what}: gave up after {} attempts; last: {reason}",
                    policy.attempts
                ),
            ));
        }
        let backoff = policy.base.saturating_mul(1 << retries.min(16));
        let jittered = backoff.mul_f64(rand::random::<f64>());
        let wait = retry_after.unwrap_or(jittered).min(policy.max_wait);
        retries += 1;
        warn!(api, request = %what, retry = retries, wait_ms = wait.as_millis() as u64, %reason, "retrying");
        tokio::time::sleep(wait).await;
    }
}

/// A reqwest error with its causes, without its URL (a FRED URL carries
/// the API key).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// An HTTP client for the APIs, with a user agent and timeouts.
pub fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("tickmesh/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| Error::invalid("http client", e.to_string()))
}

/// Reads a required secret from the environment, naming it when missing.
pub fn secret(name: &str, api: &'static str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => Err(Error::invalid(
            api,
            format!("set {name} in the environment (the {api} API needs it)"),
        )),
    }
}
