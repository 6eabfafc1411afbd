//! Retrying a whole store operation across an outage.
//!
//! The SDK already retries each request a few times within seconds; an outage of a store
//! being restarted lasts longer. [`until`] repeats an operation that failed for a transient
//! reason ([`Error::is_transient`]) with exponential back-off until it succeeds, fails for a
//! reason a retry cannot cure, or a deadline passes: a round's work waits for the store to
//! return instead of failing the round.

use super::Result;
use rand::Rng;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// First pause after a failure.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between attempts: the store is retried at least this often once it is back.
const MAX_PAUSE: Duration = Duration::from_secs(4);

/// Runs `op` until it succeeds, fails with a non-transient error, or `deadline` passes (the
/// last error is returned then). `what` names the operation in the log: the first transient
/// failure is logged at WARN, a later success at INFO.
///
/// # Errors
/// The last error of `op`.
pub async fn until<T, F, Fut>(what: &str, deadline: Instant, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut pause = FIRST_PAUSE;
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(
                        "{what}: succeeded after {failures} failed attempt(s); the store is back"
                    );
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(e);
                }
                if failures == 0 {
                    tracing::warn!(
                        "{what}: {e}; retrying with back-off for up to {:.0} s",
                        (deadline - now).as_secs_f64()
                    );
                }
                failures += 1;
                let jittered = pause / 2 + (pause / 2).mul_f64(rand::rng().random::<f64>());
                tokio::time::sleep_until((now + jittered).min(deadline)).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Error;
    use std::cell::Cell;

    fn unreachable() -> Error {
        Error::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            reason: "Connection refused".into(),
            hint: "test",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = Cell::new(0);
        let r = until("test", Instant::now() + Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 4 {
                    Err(unreachable())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_the_retries_with_the_last_error() {
        let start = Instant::now();
        let r: Result<()> = until("test", start + Duration::from_secs(10), || async {
            Err(unreachable())
        })
        .await;
        assert!(matches!(r, Err(Error::Unreachable { .. })));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(10) && waited < Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_returned_at_once() {
        let calls = Cell::new(0);
        let r: Result<()> = until("test", Instant::now() + Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            async {
                Err(Error::NotFound {
                    endpoint: "e".into(),
                    bucket: "b".into(),
                    key: "k".into(),
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
    }
}
