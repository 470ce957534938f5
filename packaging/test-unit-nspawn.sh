#!/usr/bin/env bash
# The hardened unit under a real systemd: boots the package test's cached Debian 12 root with
# systemd-nspawn (private network: only its own loopback), with MESHD.deb installed and meshd
# configured as a coordinator with DNS, /metrics and the /etc/hosts and Prometheus
# integrations, and checks inside the booted container that meshd.service as packaged
# (SystemCallFilter, MemoryDenyWriteExecute, ProtectProc, UMask, ...) starts, becomes ready,
# answers meshctl, invites (a registry write), rotates its own key (key files through the
# writer), writes /etc/hosts and file_sd, keeps its state private, runs under seccomp with no
# new privileges, and that nothing was refused (no EPERM/SIGSYS in its journal, no restart).
#
#   packaging/test-unit-nspawn.sh target/debian/meshd_0.1.0-1_amd64.deb
#
# As root, after packaging/test-deb.sh has cached the Debian 12 root in /var/cache/meshd-deb.
# Needs systemd-nspawn (Debian package systemd-container) and /dev/net/tun. Nothing is
# configured outside the container; the container's root is removed at exit.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deb=$(realpath "${1:?usage: $0 MESHD.deb}")
CACHE=/var/cache/meshd-deb
BASE=$CACHE/bookworm-minbase-man-db-systemd-procps.tar.gz
ARCHIVES=$CACHE/archives
fail() { echo "FAIL: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || fail "run as root"
command -v systemd-nspawn >/dev/null || fail "systemd-nspawn is missing: apt-get install systemd-container"
[[ -f $BASE ]] || fail "$BASE is missing: run packaging/test-deb.sh first (it caches the root)"
[[ -c /dev/net/tun ]] || fail "/dev/net/tun is missing"

work=$(mktemp -d /tmp/meshd-nspawn.XXXXXX)
root=$work/root
out=$work/out
cleanup() {
  local rc=$?
  if grep -q " $work" /proc/self/mountinfo; then
    echo "test-unit-nspawn.sh: something is mounted under $work; not removing it" >&2
  else
    rm -rf "$work"
  fi
  return $rc
}
trap cleanup EXIT
mkdir -p "$root" "$out"
tar -C "$root" --numeric-owner -xzf "$BASE"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
APT=(apt-get -o Dpkg::Use-Pty=0 -y -q)
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp "$deb" "$root/tmp/meshd.deb"
mkdir -p "$ARCHIVES"
find "$ARCHIVES" -name '*.deb' -exec cp -t "$root/var/cache/apt/archives/" {} +
if ! in_root "${APT[@]}" install --no-install-recommends /tmp/meshd.deb >"$work/apt.log" 2>&1; then
  in_root "${APT[@]}" update >>"$work/apt.log" 2>&1
  in_root "${APT[@]}" install --no-install-recommends /tmp/meshd.deb >>"$work/apt.log" 2>&1 \
    || { cat "$work/apt.log" >&2; fail "apt-get install of the .deb"; }
fi
rm -f "$root/usr/sbin/policy-rc.d"

# debootstrap's minbase has no /etc/hosts; an installed system has one.
printf '127.0.0.1\tlocalhost\n' > "$root/etc/hosts"
# A coordinator: its own key, DNS on :53, /metrics, /etc/hosts and file_sd integrations.
mkdir -p "$root/etc/prometheus/file_sd"
cat > "$root/etc/meshd/meshd.toml" <<'EOF'
[host]
name = "nspawn-load"
address = "10.99.99.1/24"
interface = "wgmesh0"
listen_port = 51871
private_key_file = "/etc/meshd/private.key"

[daemon]
backend = "userspace"

[coordinator]
mesh_cidr = "10.99.99.0/24"
public_endpoints = ["192.0.2.1:51871"]
database = "/var/lib/meshd/coordinator.db"

[dns]
enable = true
listen_port = 53

[metrics]
enable = true
listen_port = 51873

[integrations.hosts]

[integrations.prometheus]
EOF
in_root meshd --check-config --config /etc/meshd/meshd.toml

# The checks, run inside the booted container once; results in /out/result, then poweroff.
cat > "$root/usr/local/sbin/meshd-nspawn-check" <<'EOF'
#!/bin/sh
set -u
r=/out/result
ok() { echo "ok: $*" >> $r; }
bad() { echo "FAIL: $*" >> $r; }
check() { what=$1; shift; if "$@" >> /out/commands.txt 2>&1; then ok "$what"; else bad "$what"; fi; }
i=0
until [ "$(systemctl is-active meshd)" = active ] || [ $i -ge 120 ]; do sleep 0.5; i=$((i + 1)); done
systemctl status --no-pager meshd > /out/systemctl-status.txt 2>&1
if [ "$(systemctl is-active meshd)" = active ]; then ok "meshd.service is active (READY=1 sent)"; else bad "meshd.service is $(systemctl is-active meshd)"; fi
check "meshctl status" meshctl status
check "meshctl invite (a registry write)" meshctl invite nspawn-test
check "meshctl rotate (key files through the writer)" meshctl rotate
check "/etc/hosts holds meshd's block" grep -q "BEGIN meshd" /etc/hosts
check "file_sd written" test -s /etc/prometheus/file_sd/meshd.json
[ "$(stat -c %a /var/lib/meshd)" = 700 ] && ok "state dir 0700" || bad "state dir $(stat -c %a /var/lib/meshd)"
for f in /var/lib/meshd/coordinator.db /var/lib/meshd/coordinator.db-wal /var/lib/meshd/coordinator.db-shm; do
  [ "$(stat -c %a $f 2>&1)" = 600 ] && ok "$f 0600" || bad "$f $(stat -c %a $f 2>&1)"
done
pid=$(systemctl show -p MainPID --value meshd)
grep -E '^(Seccomp|NoNewPrivs|CapBnd|CapEff):' /proc/$pid/status > /out/proc-status.txt
grep -q '^Seccomp:[[:space:]]*2' /proc/$pid/status && ok "meshd runs under a seccomp filter" || bad "no seccomp filter"
grep -q '^NoNewPrivs:[[:space:]]*1' /proc/$pid/status && ok "NoNewPrivs" || bad "NoNewPrivs not set"
awk '/^Umask:/ { exit !($2 == "0077") }' /proc/$pid/status && ok "umask 0077" || bad "umask $(awk '/^Umask:/ {print $2}' /proc/$pid/status)"
systemctl show -p NRestarts --value meshd | grep -qx 0 && ok "no restart" || bad "meshd restarted"
for p in $(pgrep -f /usr/bin/meshd-wg); do
  grep -q '^Seccomp:[[:space:]]*2' /proc/$p/status && ok "meshd-wg (pid $p) runs under the filter" || bad "meshd-wg without seccomp"
done
journalctl -b -u meshd --no-pager -o short-monotonic > /out/journal.txt 2>&1
if grep -Eiq 'operation not permitted|bad system call|SIGSYS|core-dump|permission denied' /out/journal.txt; then
  bad "meshd's journal reports a refusal (see journal.txt)"
else
  ok "no EPERM/SIGSYS/permission denied in meshd's journal"
fi
systemctl poweroff --no-block
EOF
chmod 755 "$root/usr/local/sbin/meshd-nspawn-check"
cat > "$root/etc/systemd/system/meshd-nspawn-check.service" <<'EOF'
[Unit]
Description=check meshd under its hardened unit
After=meshd.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/meshd-nspawn-check
[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable meshd.service meshd-nspawn-check.service >/dev/null 2>&1
echo "booting Debian 12 with meshd under systemd-nspawn (private network)"
t0=$SECONDS
timeout 300 systemd-nspawn -q -D "$root" --register=no --keep-unit --private-network \
  --bind=/dev/net/tun --property="DeviceAllow=/dev/net/tun rwm" --bind="$out:/out" \
  --console=pipe -b </dev/null >"$work/console.log" 2>&1 || true
echo "container ran $((SECONDS - t0)) s"
[[ -f $out/result ]] || { tail -n 40 "$work/console.log" >&2; fail "the checks did not run"; }
cat "$out/result"
cat "$out/proc-status.txt" 2>/dev/null || true
if grep -q '^FAIL' "$out/result"; then
  echo "--- meshd's journal" >&2; tail -n 60 "$out/journal.txt" >&2
  echo "--- commands" >&2; tail -n 40 "$out/commands.txt" >&2
  fail "meshd under its hardened unit"
fi
echo "== meshd runs under the hardened unit: ok"
