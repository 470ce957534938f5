//! Shared by the integration tests that need real network namespaces.

/// Run `body` on a thread of its own, in a new network namespace and a new mount namespace
/// with a private `/run` (so `/var/run/wireguard` is ours alone), on a current-thread runtime
/// so every socket and child process is made from that thread. The namespaces go away with
/// the thread and the processes in them.
pub fn in_private_namespaces<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        use nix::mount::{mount, MsFlags};
        use nix::sched::{unshare, CloneFlags};
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare (needs root)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )
        .expect("private /run");
        std::fs::create_dir_all("/run/wireguard").expect("mkdir /run/wireguard");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(body());
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}
