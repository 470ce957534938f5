//! Scenarios that need kernel WireGuard, run in a VM of Debian 12's kernel (meshlab::vm,
//! tests/README.md): the host kernel here has no wireguard module loaded.
//! Run as root: `cargo test -p meshlab --test vm -- --nocapture` (prints the console and the
//! boot and total times). `MESHD_SKIP_VM=1` skips them (saying so); by default they run.

use std::time::Duration;

use anyhow::Result;
use meshlab::vm::{run_in_vm, skip_requested, VmOpts};

/// Two namespaces joined by a veth pair, a kernel `wireguard` link in each configured with
/// `wg`, a ping across the tunnel and a handshake both sides saw.
const TWO_NAMESPACES_WIREGUARD: &str = r#"set -eux
ip netns add a
ip netns add b
ip link add va netns a type veth peer name vb netns b
ip -n a addr add 10.0.0.1/24 dev va
ip -n b addr add 10.0.0.2/24 dev vb
for n in a b; do ip -n $n link set lo up; done
ip -n a link set va up
ip -n b link set vb up
umask 077
wg genkey > /tmp/a.key
wg genkey > /tmp/b.key
pa=$(wg pubkey < /tmp/a.key)
pb=$(wg pubkey < /tmp/b.key)
ip -n a link add wg0 type wireguard
ip -n b link add wg0 type wireguard
ip netns exec a wg set wg0 listen-port 51820 private-key /tmp/a.key \
  peer "$pb" endpoint 10.0.0.2:51820 allowed-ips 10.9.0.2/32
ip netns exec b wg set wg0 listen-port 51820 private-key /tmp/b.key \
  peer "$pa" endpoint 10.0.0.1:51820 allowed-ips 10.9.0.1/32
ip -n a addr add 10.9.0.1/24 dev wg0
ip -n b addr add 10.9.0.2/24 dev wg0
ip -n a link set wg0 up
ip -n b link set wg0 up
ip netns exec a ping -c 3 -i 0.2 -W 5 10.9.0.2
ip netns exec b ping -c 1 -W 5 10.9.0.1
ip netns exec a wg show wg0
for n in a b; do
  hs=$(ip netns exec $n wg show wg0 latest-handshakes | awk '{print $2}')
  [ "$hs" -gt 0 ]
done
echo "kernel wireguard: ok"
"#;

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn vm_boots_and_runs_kernel_wireguard() -> Result<()> {
    if skip_requested("the VM smoke test") {
        return Ok(());
    }
    let opts = VmOpts {
        timeout: Duration::from_secs(240),
        ..VmOpts::default()
    };
    let cmd = ["sh", "-c", TWO_NAMESPACES_WIREGUARD].map(String::from);
    let run = run_in_vm(&cmd, &opts)?;
    assert!(
        !run.job_dir.exists(),
        "{} was left behind",
        run.job_dir.display()
    );
    run.report("vm", &opts)?;
    assert!(
        run.output.contains("kernel wireguard: ok"),
        "the script did not finish:\n{}",
        run.output
    );
    Ok(())
}
