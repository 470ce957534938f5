//! Blocking work (fsync, `nft` subprocesses, sysctl writes, synchronous netlink, SQLite) run
//! without holding an async worker: [`run`] hands the worker's other tasks (the control socket,
//! the API, `/metrics`) to another thread for the duration, so a slow disk or a slow `nft`
//! never stalls them. Used at the primitives (`disk::write_file`, `firewall`, `sysctl`, the
//! kernel backend) so callers need not know which calls block.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Run `f`, moving the current async worker's other tasks elsewhere while it blocks. On a
/// current-thread runtime (unit tests), outside a runtime and on a blocking-pool thread `f`
/// simply runs.
pub fn run<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// While a task blocks in `run`, a task queued behind it on the same (only) worker still
    /// runs: without the hand-off it would wait until the blocking call returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_blocked_worker_hands_its_other_tasks_on() {
        let blocked = tokio::spawn(async {
            let ran = Arc::new(AtomicBool::new(false));
            let flag = ran.clone();
            tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
            super::run(|| {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if ran.load(Ordering::SeqCst) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                false
            })
        });
        assert!(
            blocked.await.expect("the blocking task panicked"),
            "a task queued on the blocked worker did not run for 5 s"
        );
    }

    #[tokio::test]
    async fn on_a_current_thread_runtime_it_runs_inline() {
        assert_eq!(super::run(|| 7), 7);
    }

    #[test]
    fn outside_a_runtime_it_runs_inline() {
        assert_eq!(super::run(|| 7), 7);
    }
}
