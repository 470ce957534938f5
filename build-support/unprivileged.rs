//! Build script shared by the crates whose tests need root (namespaces, netlink, mounts,
//! WireGuard devices). When the build does not run as root it sets `cfg(unprivileged)`, and
//! those tests carry `#[cfg_attr(unprivileged, ignore = "needs root: ...")]`: `cargo test`
//! as another user lists each as ignored with its reason and counts it in the summary,
//! instead of failing it. As root (CI, tests/run.sh) they run.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(unprivileged)");
    // Re-decide when the build changes hands (sudo sets these).
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    if euid != Some(0) {
        println!("cargo::rustc-cfg=unprivileged");
    }
}
