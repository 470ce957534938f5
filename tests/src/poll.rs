//! Waiting: poll a condition until a deadline. The lab never sleeps a fixed time to "let
//! things settle"; it asks, and gives up with a message naming what it waited for.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How long to wait between two polls of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Call `cond` until it returns `Ok(true)` or `timeout` has passed. Errors from `cond` are kept
/// (the last one is reported on timeout) but do not stop the polling.
pub fn poll_until<F>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Like [`poll_until`], but the condition produces a value once ready.
pub fn poll_for<T, F>(timeout: Duration, what: &str, mut cond: F) -> Result<T>
where
    F: FnMut() -> Result<Option<T>>,
{
    let mut out = None;
    poll_until(timeout, what, || {
        out = cond()?;
        Ok(out.is_some())
    })?;
    match out {
        Some(v) => Ok(v),
        None => bail!("{what}: condition reported ready without a value"),
    }
}
