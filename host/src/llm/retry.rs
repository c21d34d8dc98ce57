//! Retries for provider calls: exponential backoff with jitter, `retry-after` honoured,
//! a bounded number of attempts and one overall deadline.
//!
//! Retried: 429, 5xx, 408 and network errors ([`ProviderError::is_retryable`]). The wait
//! before retry *n* (0-based) is the server's `retry-after-ms` / `retry-after` (delay
//! seconds or an HTTP date) when it sent one, else `base_delay · 2ⁿ` capped at
//! `max_delay`, of which a random half is jitter ("equal jitter"). When the wait would
//! end past the deadline, or asks for more than `max_retry_after`, the call gives up at
//! once with the last error instead of sleeping into a timeout. All time is tokio's, so
//! a paused test clock drives it.
//!
//! ```
//! use std::time::Duration;
//! use roost::llm::RetryPolicy;
//!
//! let policy = RetryPolicy { max_retries: 2, ..RetryPolicy::default() };
//! for n in 0..4 {
//!     let d = policy.backoff(n);
//!     assert!(d <= policy.max_delay);
//! }
//! assert!(policy.backoff(0) >= policy.base_delay / 2);
//! ```

use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::Rng;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

use super::provider::ProviderError;

/// How a provider retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `max_retries + 1` attempts at most). Default 3.
    pub max_retries: u32,
    /// First backoff step. Default 500 ms.
    pub base_delay: Duration,
    /// Largest backoff step. Default 8 s.
    pub max_delay: Duration,
    /// The longest `retry-after` the host will wait; longer asks fail at once. Default 60 s.
    pub max_retry_after: Duration,
    /// Overall bound on one call, every attempt and wait included. Default 30 s.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry `n` (0-based) when the server gave no `retry-after`:
    /// `base_delay · 2ⁿ` capped at `max_delay`, the upper half random.
    pub fn backoff(&self, n: u32) -> Duration {
        let step = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(self.max_delay);
        let half = step / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// Runs `attempt` until it succeeds, fails for good, runs out of retries or the
    /// overall deadline passes ([`ProviderError::Timeout`]).
    pub async fn run<T, F, Fut>(&self, mut attempt: F) -> Result<T, ProviderError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut n = 0;
        loop {
            let result = match tokio::time::timeout_at(deadline, attempt(n)).await {
                Ok(r) => r,
                Err(_) => return Err(ProviderError::Timeout),
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !err.is_retryable() || n >= self.max_retries {
                return Err(err);
            }
            let wait = match &err {
                ProviderError::RateLimited {
                    retry_after: Some(d),
                } => {
                    if *d > self.max_retry_after {
                        tracing::debug!(wait = ?d, "provider asks to wait longer than allowed; giving up");
                        return Err(err);
                    }
                    *d
                }
                _ => self.backoff(n),
            };
            if Instant::now() + wait >= deadline {
                tracing::debug!(?wait, "next retry would pass the deadline; giving up");
                return Err(err);
            }
            tracing::debug!(attempt = n + 1, ?wait, error = %err, "provider call failed; retrying");
            tokio::time::sleep(wait).await;
            n += 1;
        }
    }
}

/// The server's requested wait: `retry-after-ms` (milliseconds, sent by OpenAI and
/// Azure), else `retry-after` as delay seconds (fractions accepted) or an HTTP date
/// (relative to `now`; a date in the past means no wait).
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = get("retry-after")?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after(
                &headers(&[("retry-after-ms", "250"), ("retry-after", "9")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(42))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "soon")]), now),
            None
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "-3")]), now),
            None
        );
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for n in 0..40 {
            let d = p.backoff(n);
            let step = (p.base_delay * 2u32.pow(n.min(10))).min(p.max_delay);
            assert!(d >= step / 2 && d <= step, "n={n} d={d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_honouring_retry_after() {
        let p = RetryPolicy::default();
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let out = p
            .run(|_| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(ProviderError::RateLimited {
                        retry_after: Some(Duration::from_secs(5)),
                    })
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(out, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(start.elapsed().as_secs(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_retries_or_on_fatal_errors() {
        let p = RetryPolicy {
            max_retries: 2,
            ..RetryPolicy::default()
        };
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = p
            .run(|_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ProviderError::Server {
                    status: 503,
                    excerpt: String::new(),
                })
            })
            .await;
        assert!(matches!(
            out,
            Err(ProviderError::Server { status: 503, .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let out: Result<(), _> = p
            .run(|_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ProviderError::Auth {
                    status: 401,
                    excerpt: String::new(),
                })
            })
            .await;
        assert!(matches!(out, Err(ProviderError::Auth { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_deadline_fails_at_once() {
        let p = RetryPolicy {
            timeout: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        let start = Instant::now();
        let out: Result<(), _> = p
            .run(|_| async {
                Err(ProviderError::RateLimited {
                    retry_after: Some(Duration::from_secs(30)),
                })
            })
            .await;
        assert!(matches!(out, Err(ProviderError::RateLimited { .. })));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn overall_timeout_bounds_a_slow_attempt() {
        let p = RetryPolicy {
            timeout: Duration::from_secs(2),
            ..RetryPolicy::default()
        };
        let out: Result<(), _> = p
            .run(|_| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            })
            .await;
        assert_eq!(out, Err(ProviderError::Timeout));
    }
}
