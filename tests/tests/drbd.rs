//! DRBD over the mesh (issue 16 item 3), in two VMs of Debian 12's kernel (meshlab::vm), which
//! ships drbd.ko (8.4) and wireguard.ko: this machine's kernel has neither.
//!
//! The VMs share an Ethernet link ([`VmLink::pair`]: 192.168.77.1 and .2, inside the VMs
//! only). Each runs meshd on kernel WireGuard, two static peers: dock-prod (10.99.99.2) and
//! dock-mirror (10.99.99.3), with `[[integrations.drbd]]` r0 on a 64 MiB loop device. What the
//! README documents as DRBD's first setup is what each VM does: meshd writes
//! `/etc/drbd.d/r0.res`, its reload (`drbdadm adjust r0`) fails for want of metadata and is
//! reported as pending with the file kept; `drbdadm create-md r0`, then `meshctl reload`, and
//! meshd's retried `drbdadm adjust r0` brings r0 up. dock-prod becomes primary (`--force`), the
//! initial sync runs over the mesh to UpToDate/UpToDate; dock-prod writes an 8 MiB file on
//! ext4, unmounts and steps down; dock-mirror becomes primary and reads the same SHA-256.
//!
//! Checked here: both jobs succeed, DRBD's TCP connections run between the two mesh addresses
//! (`ss -tn`), the sync's bytes went through wgmesh0, the checksums match. Printed: boot
//! times, mesh up, connection, sync and UpToDate times, bytes through wgmesh0.
//!
//! Run as root: `cargo build -p meshd -p meshctl && cargo test -p meshlab --test drbd --
//! --nocapture`. Needs qemu, drbd-utils, e2fsprogs and losetup (mount) on the host (the VMs run
//! the host's root read-only; tests/deps.sh). `MESHD_SKIP_VM=1` skips it (saying so); a
//! missing VM environment fails it.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use meshlab::vm::{run_pair_in_vm, skip_requested, VmLink, VmOpts, VmRun};
use meshlab::{bin_dir, generate_keypair, MESH_IFACE, MESH_PORT};

/// (mesh name, mesh address, underlay address inside its VM)
const PRIMARY: (&str, &str, &str) = ("dock-prod", "10.99.99.2", "192.168.77.1");
const SECONDARY: (&str, &str, &str) = ("dock-mirror", "10.99.99.3", "192.168.77.2");
/// The built-in template's port for the first resource.
const DRBD_PORT: u16 = 7788;
/// The backing device's size; the initial sync copies all of it.
const DISK_MIB: u64 = 64;

/// What each VM runs (`/bin/sh`, the host's dash). Environment: ME, PEER, PEER_MESH, ROLE
/// (`source`: dock-prod, `target`: dock-mirror), CONF (the directory with the configs and
/// keys), BIN (meshd and meshctl). Prints `FIG name=value`, `SS <ss line>` and `SHA <hex>`.
const SCRIPT: &str = r#"set -eu
t0=$(date +%s.%N)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
fig() { echo "FIG $1=$2"; }
# wait_for DESC SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds.
wait_for() {
  desc=$1 end=$(($(date +%s) + $2))
  shift 2
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || { echo "TIMEOUT: $desc"; return 1; }
    sleep 0.2
  done
}
diag() {
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- $ME failed ($rc): meshd log, meshctl status, /proc/drbd, kernel log"
    tail -n 40 /tmp/meshd.log || true
    ctl status || true
    cat /proc/drbd || true
    dmesg | tail -n 30 || true
  fi
}
trap diag EXIT
ctl() { "$BIN/meshctl" --socket /run/meshd/meshd.sock "$@"; }

# drbdadm finds its `on` section by the node name; it locks under /run/lock. /etc is the
# host's, read-only: the VM gets its own /etc/drbd.d.
# DRBD's kernel messages stay out of the console (the failure report shows dmesg).
dmesg -n 1
hostname "$ME"
mkdir -p /run/lock /run/meshd /tmp/r0
mount -t tmpfs -o mode=0755 tmpfs /etc/drbd.d
mount -t tmpfs -o mode=0700 tmpfs /var/lib/drbd
printf 'global { usage-count no; }\ncommon { disk { c-plan-ahead 0; resync-rate 100M; } }\n' \
  >/etc/drbd.d/global_common.conf
truncate -s "${DISK_MIB}M" /tmp/r0.img
losetup /dev/loop0 /tmp/r0.img

"$BIN/meshd" --config "$CONF/$ME.toml" >/tmp/meshd.log 2>&1 &
pings() { ping -c 1 -W 1 "$PEER_MESH" >/dev/null 2>&1; }
wait_for "a ping over the mesh to $PEER_MESH" 90 pings
fig mesh_secs "$(since "$t0")"

# DRBD's first setup (README, "DRBD's first setup"): meshd writes the resource; its reload
# fails (no metadata yet), the file stays and the reload is retried.
wait_for "meshd's /etc/drbd.d/r0.res" 30 test -f /etc/drbd.d/r0.res
cat /etc/drbd.d/r0.res
pending() { ctl status | grep -q 'drbd:r0 .* FAILED: reload: .*the reload is retried'; }
wait_for "meshd reporting r0's reload as pending" 30 pending
ctl status | grep 'drbd:r0'
drbdadm create-md --force r0
ctl reload
reloaded() { ctl status | grep -q 'drbd:r0 /etc/drbd.d/r0.res ok'; }
wait_for "meshd's retried drbdadm adjust r0" 60 reloaded
ctl status | grep 'drbd:r0'
# Connected, or already syncing (the peer may have gone primary in the meantime).
connected() { case $(drbdadm cstate r0) in Connected | Sync*) ;; *) return 1 ;; esac; }
wait_for "r0 connected" 60 connected
fig connected_secs "$(since "$t0")"

uptodate() { [ "$(drbdadm dstate r0)" = UpToDate/UpToDate ]; }
role() { [ "$(drbdadm role r0)" = "$1" ]; }
sha() { echo "SHA $(sha256sum </tmp/r0/data | cut -d' ' -f1)"; }
if [ "$ROLE" = source ]; then
  t1=$(now)
  drbdadm primary --force r0
  wait_for "UpToDate/UpToDate" 180 uptodate
  fig sync_secs "$(since "$t1")"
  fig uptodate_secs "$(since "$t0")"
  ss -tn | sed 's/^/SS /'
  fig wg_bytes "$(cat /sys/class/net/wgmesh0/statistics/tx_bytes)"
  mkfs.ext4 -q -E nodiscard /dev/drbd0
  mount /dev/drbd0 /tmp/r0
  head -c 8M /dev/urandom >/tmp/r0/data
  sha
  umount /tmp/r0
  drbdadm secondary r0
  wait_for "$PEER taking r0 over" 120 role Secondary/Primary
  gone() { [ "$(drbdadm cstate r0)" != Connected ]; }
  wait_for "$PEER leaving r0" 120 gone
else
  wait_for "$PEER promoting r0" 120 role Secondary/Primary
  wait_for "UpToDate/UpToDate" 180 uptodate
  fig uptodate_secs "$(since "$t0")"
  fig wg_bytes "$(cat /sys/class/net/wgmesh0/statistics/rx_bytes)"
  wait_for "$PEER stepping down" 120 role Secondary/Secondary
  drbdadm primary r0
  mount /dev/drbd0 /tmp/r0
  sha
  umount /tmp/r0
  drbdadm secondary r0
fi
drbdadm down r0
echo "DRBD-DONE"
"#;

/// A host directory (0700, in the temp directory) the VMs read: configs and keys. Removed
/// when dropped.
struct ConfDir(PathBuf);

impl Drop for ConfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// `me`'s meshd.toml: kernel WireGuard, the other host as a static peer at its underlay
/// address, r0 on /dev/loop0 with every DRBD default (port, path, check, reload).
fn meshd_toml(
    conf: &Path,
    me: (&str, &str, &str),
    peer: (&str, &str, &str),
    peer_key: &str,
) -> String {
    format!(
        r#"[host]
name = "{name}"
address = "{mesh}/24"
interface = "{MESH_IFACE}"
listen_port = {MESH_PORT}
private_key_file = "{key}"

[daemon]
backend = "kernel"
control_socket = "/run/meshd/meshd.sock"
state_dir = "/run/meshd/state"
reconcile_interval_secs = 5

[dns]
enable = false

[metrics]
enable = false

[[integrations.drbd]]
resource = "r0"
hosts = ["{p}", "{s}"]
disk = "/dev/loop0"

[[peer]]
name = "{peer_name}"
public_key = "{peer_key}"
endpoint = "{peer_underlay}:{MESH_PORT}"
allowed_ips = ["{peer_mesh}/32"]
"#,
        name = me.0,
        mesh = me.1,
        key = conf.join(format!("{}.key", me.0)).display(),
        p = PRIMARY.0,
        s = SECONDARY.0,
        peer_name = peer.0,
        peer_mesh = peer.1,
        peer_underlay = peer.2,
    )
}

/// The `FIG name=value` lines of a run.
fn figures(run: &VmRun) -> BTreeMap<String, String> {
    run.output
        .lines()
        .filter_map(|l| l.strip_prefix("FIG ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn sha(run: &VmRun, who: &str) -> Result<String> {
    run.output
        .lines()
        .find_map(|l| l.strip_prefix("SHA "))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{who} printed no checksum"))
}

fn fig<'a>(f: &'a BTreeMap<String, String>, who: &str, name: &str) -> Result<&'a str> {
    f.get(name)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("{who} printed no {name}"))
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, netlink, devices, VMs): run as root to include it"
)]
fn drbd_replicates_over_the_kernel_mesh_in_two_vms() -> Result<()> {
    if skip_requested("the DRBD test in two VMs") {
        return Ok(());
    }
    let bin = bin_dir();
    for b in ["meshd", "meshctl"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} is missing: cargo build -p meshd -p meshctl first",
                bin.join(b).display()
            );
        }
    }
    let conf = ConfDir(std::env::temp_dir().join(format!("meshd-drbd-{}", std::process::id())));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&conf.0)
        .with_context(|| format!("creating {}", conf.0.display()))?;
    let (key_p, pub_p) = generate_keypair();
    let (key_s, pub_s) = generate_keypair();
    for (me, peer, key, peer_pub) in [
        (PRIMARY, SECONDARY, &key_p, &pub_s),
        (SECONDARY, PRIMARY, &key_s, &pub_p),
    ] {
        write_file(
            &conf.0.join(format!("{}.key", me.0)),
            &format!("{key}\n"),
            0o600,
        )?;
        write_file(
            &conf.0.join(format!("{}.toml", me.0)),
            &meshd_toml(&conf.0, me, peer, peer_pub),
            0o644,
        )?;
    }

    let (link_p, link_s) =
        VmLink::pair(&format!("{}/24", PRIMARY.2), &format!("{}/24", SECONDARY.2))?;
    let opts = |me: (&str, &str, &str), peer: (&str, &str, &str), role: &str, link: VmLink| {
        VmOpts {
            timeout: Duration::from_secs(420),
            label: me.0.to_owned(),
            modules: ["drbd", "loop", "ext4"].map(String::from).to_vec(),
            link: Some(link),
            visible: vec![conf.0.clone()],
            ..VmOpts::default()
        }
        .env("ME", me.0)
        .env("PEER", peer.0)
        .env("PEER_MESH", peer.1)
        .env("ROLE", role)
        .env("DISK_MIB", &DISK_MIB.to_string())
        .env("CONF", &conf.0.to_string_lossy())
        .env("BIN", &bin.to_string_lossy())
    };
    let opts_p = opts(PRIMARY, SECONDARY, "source", link_p);
    let opts_s = opts(SECONDARY, PRIMARY, "target", link_s);
    let cmd = ["sh", "-c", SCRIPT].map(String::from);
    let (run_p, run_s) = run_pair_in_vm((&cmd, &opts_p), (&cmd, &opts_s))?;
    // Both reports before failing on either, so both wall times show.
    let rp = run_p.report("drbd", &opts_p).map(|_| ());
    let rs = run_s.report("drbd", &opts_s).map(|_| ());
    rp.with_context(|| format!("{} (the primary first)", PRIMARY.0))?;
    rs.with_context(|| format!("{} (the secondary first)", SECONDARY.0))?;
    for (run, who) in [(&run_p, PRIMARY.0), (&run_s, SECONDARY.0)] {
        assert!(
            run.output.contains("DRBD-DONE"),
            "{who} did not finish:\n{}",
            run.output
        );
    }

    // DRBD's TCP connections run between the two mesh addresses, one end on its port.
    let drbd_conns: Vec<&str> = run_p
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("SS "))
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 5
                && w[0] == "ESTAB"
                && [w[3], w[4]]
                    .iter()
                    .any(|a| a.ends_with(&format!(":{DRBD_PORT}")))
        })
        .collect();
    assert!(
        !drbd_conns.is_empty(),
        "no DRBD connection in ss -tn:\n{}",
        run_p.output
    );
    for l in &drbd_conns {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (local, peer) = (w[3], w[4]);
        assert!(
            local.starts_with(&format!("{}:", PRIMARY.1))
                && peer.starts_with(&format!("{}:", SECONDARY.1)),
            "a DRBD connection off the mesh: {l}"
        );
    }

    let fp = figures(&run_p);
    let fs = figures(&run_s);
    // The initial sync copies the whole disk through the tunnel.
    let disk = DISK_MIB << 20;
    for (f, who, dir) in [(&fp, PRIMARY.0, "sent"), (&fs, SECONDARY.0, "received")] {
        let bytes: u64 = fig(f, who, "wg_bytes")?.parse()?;
        assert!(
            bytes > disk * 9 / 10,
            "{who} {dir} only {bytes} bytes through {MESH_IFACE} for a {DISK_MIB} MiB sync"
        );
    }
    let (sp, ss) = (sha(&run_p, PRIMARY.0)?, sha(&run_s, SECONDARY.0)?);
    assert_eq!(sp, ss, "the file read on {} differs", SECONDARY.0);

    let sync: f64 = fig(&fp, PRIMARY.0, "sync_secs")?.parse()?;
    let boot = |r: &VmRun| r.boot_secs.map_or("-".into(), |b| format!("{b:.1}"));
    println!("DRBD over the kernel mesh, two VMs (TCG):");
    println!(
        "  boot: {} {} s, {} {} s; whole run {:.1} s",
        PRIMARY.0,
        boot(&run_p),
        SECONDARY.0,
        boot(&run_s),
        run_p.total_secs.max(run_s.total_secs)
    );
    for (f, who) in [(&fp, PRIMARY.0), (&fs, SECONDARY.0)] {
        println!(
            "  {who}: mesh up {} s, r0 connected {} s, UpToDate/UpToDate {} s after the job \
             started; {} bytes through {MESH_IFACE}",
            fig(f, who, "mesh_secs")?,
            fig(f, who, "connected_secs")?,
            fig(f, who, "uptodate_secs")?,
            fig(f, who, "wg_bytes")?,
        );
    }
    println!(
        "  initial sync of {DISK_MIB} MiB: {sync:.1} s ({:.1} MiB/s); DRBD connections: {}",
        DISK_MIB as f64 / sync.max(0.1),
        drbd_conns.len()
    );
    println!(
        "  8 MiB file written on {}, read back on {}: sha256 {sp}",
        PRIMARY.0, SECONDARY.0
    );
    Ok(())
}
