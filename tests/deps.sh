# shellcheck shell=bash
# Installs what the lab and the test suite need, only where missing. Sourced by tests/run.sh
# and tests/lab.sh. Debian 12, as root.

meshd_need_root() {
  if [[ $EUID -ne 0 ]]; then
    echo "this needs root (network namespaces, TUN devices): run it with sudo" >&2
    exit 1
  fi
}

meshd_install_deps() {
  # command -> Debian package
  local -A pkgs=(
    [wg]=wireguard-tools [wg-quick]=wireguard-tools [wireguard-go]=wireguard-go [iperf3]=iperf3
    [nft]=nftables [ip]=iproute2 [ping]=iputils-ping [jq]=jq [python3]=python3
    [unshare]=util-linux [nsenter]=util-linux [pgrep]=procps [cc]=gcc [curl]=curl
    # The coexistence lab plants K3s-like chains with iptables-nft.
    [iptables]=iptables
    # Integration checks: promtool (in Debian's prometheus package) and drbdadm.
    [promtool]=prometheus [drbdadm]=drbd-utils
    # Mesh DNS checks.
    [dig]=dnsutils
    # The coordinator's online backup (docs/OPERATIONS.md), rehearsed by the coordinator_move test.
    [sqlite3]=sqlite3
    # The VM lab (tests/vm/prepare.sh, meshlab::vm): qemu, and what builds its initramfs.
    [qemu-system-x86_64]=qemu-system-x86 [modprobe]=kmod [depmod]=kmod [cpio]=cpio
    [flock]=util-linux [xz]=xz-utils [readelf]=binutils
    # The DRBD test runs these (the host's) in its VMs: a loop device, ext4, DRBD's sockets.
    [losetup]=mount [mkfs.ext4]=e2fsprogs [ss]=iproute2 [sha256sum]=coreutils
    # The man page tests (meshd-docgen's groff_warnings) run groff; man-db reads the pages.
    [groff]=groff-base [man]=man-db
  )
  local missing=() cmd
  for cmd in "${!pkgs[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkgs[$cmd]}")
  done
  # The security suite runs Debian's python3 as `nobody` (a toolchain under /root is not theirs).
  [[ -x /usr/bin/python3 ]] || missing+=(python3)
  # The VM's initramfs has no libc: it needs busybox-static's /bin/busybox, not busybox's.
  if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
    missing+=(busybox-static)
  fi
  if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing missing packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    if [[ -x $HOME/.cargo/bin/cargo ]]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "cargo is missing: install the Rust toolchain (rustup) first" >&2
      exit 1
    fi
  fi
  [[ -c /dev/net/tun ]] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
  return 0
}

# What the package test (packaging/test-deb.sh) needs on top: lintian, debootstrap (the
# Debian 12 chroot), systemd-analyze (verify), and cargo-deb from crates.io.
meshd_install_package_deps() {
  local -A pkgs=([lintian]=lintian [debootstrap]=debootstrap [systemd-analyze]=systemd
    [dpkg-deb]=dpkg [gzip]=gzip
    # The hardened unit is booted under systemd-nspawn (packaging/test-unit-nspawn.sh).
    [systemd-nspawn]=systemd-container)
  local missing=() cmd
  for cmd in "${!pkgs[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkgs[$cmd]}")
  done
  if ((${#missing[@]})); then
    echo "installing missing packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked
  fi
}
