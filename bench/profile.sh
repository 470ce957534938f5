#!/usr/bin/env bash
# profile.sh - where meshd-wg's CPU goes: syscalls, context switches and hot functions per GB.
#
#   sudo bench/profile.sh              # DURATION=10 STREAMS="1 4" UDP=1 RECORD=1
#
# Two network namespaces of its own (names end in this script's PID) joined by a veth, meshd-wg
# (release build; MESHD_WG=PATH uses that binary) in each, configured with `wg set`. For each
# iperf3 test (TCP with 1 and 4 streams, UDP with 1392-byte payloads = 1420-byte packets) it
# counts with `perf stat` (kernel tracepoints and software events, a few percent of overhead,
# no ptrace) the syscalls of both engines by name, their context switches and CPU time, and
# prints them per GB of payload received and per 1420-byte packet. With RECORD=1 it then samples
# both engines with `perf record -e cpu-clock` during one more TCP 1-stream test and prints the
# hottest functions. Hardware counters (cycles, cache misses) are not used: virtual machines
# often lack them. Everything made here is removed on exit; processes are stopped by PID.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DURATION=${DURATION:-10}
STREAMS=${STREAMS:-1 4}
UDP=${UDP:-1}
RECORD=${RECORD:-1}
TUN_MTU=${TUN_MTU:-1420}
OUTDIR=${OUTDIR:-${TMPDIR:-/tmp}/meshd-bench/profile-$(date +%Y%m%d-%H%M%S)}

[[ $EUID -eq 0 ]] || { echo "profile.sh: needs root (network namespaces)" >&2; exit 2; }
for tool in ip wg iperf3 jq perf awk; do
  command -v "$tool" >/dev/null || { echo "profile.sh: $tool is missing (perf: apt-get install linux-perf)" >&2; exit 2; }
done
if [[ -z ${MESHD_WG:-} ]]; then
  (cd "$ROOT" && cargo build --release -p meshd-engine --bin meshd-wg >&2)
  MESHD_WG=${CARGO_TARGET_DIR:-$ROOT/target}/release/meshd-wg
fi
mkdir -p "$OUTDIR"

ID=$$
NA=bpa$ID NB=bpb$ID IA=wgpa$ID IB=wgpb$ID
SOCKDIR=/var/run/wireguard
work=$(mktemp -d)
pids=()
cleanup() {
  set +e
  local p
  for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]+"${pids[@]}"}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  ip netns del "$NA" 2>/dev/null; ip netns del "$NB" 2>/dev/null
  rm -f "$SOCKDIR/$IA.sock" "$SOCKDIR/$IB.sock"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
ina() { ip netns exec "$NA" "$@"; }
inb() { ip netns exec "$NB" "$@"; }

ip netns add "$NA"; ip netns add "$NB"
ip link add veth0 netns "$NA" type veth peer name veth0 netns "$NB"
for n in "$NA" "$NB"; do ip netns exec "$n" ip link set lo up; ip netns exec "$n" ip link set veth0 up; done
ina ip addr add 192.0.2.1/24 dev veth0; inb ip addr add 192.0.2.2/24 dev veth0
(umask 077; wg genkey > "$work/a.key"; wg genkey > "$work/b.key")
# `ip netns exec` started directly so that $! is the engine (or iperf3) itself
LOG_LEVEL=warn ip netns exec "$NA" "$MESHD_WG" -f "$IA" > "$OUTDIR/a.log" 2>&1 & pids+=($!); EA=$!
LOG_LEVEL=warn ip netns exec "$NB" "$MESHD_WG" -f "$IB" > "$OUTDIR/b.log" 2>&1 & pids+=($!); EB=$!
ip netns exec "$NB" iperf3 -s -p 5201 > "$OUTDIR/iperf3-server.log" 2>&1 & pids+=($!)
for s in $IA $IB; do
  for _ in $(seq 100); do [[ -S $SOCKDIR/$s.sock ]] && break; sleep 0.1; done
  [[ -S $SOCKDIR/$s.sock ]] || { echo "profile.sh: engine $s did not start (see $OUTDIR)" >&2; exit 1; }
done
ina wg set "$IA" listen-port 51820 private-key "$work/a.key" \
  peer "$(wg pubkey < "$work/b.key")" endpoint 192.0.2.2:51821 allowed-ips 10.99.98.2/32
inb wg set "$IB" listen-port 51821 private-key "$work/b.key" \
  peer "$(wg pubkey < "$work/a.key")" endpoint 192.0.2.1:51820 allowed-ips 10.99.98.1/32
ina ip addr add 10.99.98.1/24 dev "$IA"; inb ip addr add 10.99.98.2/24 dev "$IB"
ina ip link set "$IA" mtu "$TUN_MTU" up; inb ip link set "$IB" mtu "$TUN_MTU" up
for _ in $(seq 40); do ina ping -c1 -W1 10.99.98.2 >/dev/null 2>&1 && break; sleep 0.2; done
ina ping -c1 -W1 10.99.98.2 >/dev/null || { echo "profile.sh: no tunnel" >&2; exit 1; }

EVENTS=task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter
for sc in sendmmsg recvmmsg sendmsg recvmsg sendto recvfrom read write readv writev \
          epoll_wait epoll_pwait poll ppoll futex sched_yield ioctl; do
  [[ -e /sys/kernel/tracing/events/syscalls/sys_enter_$sc ]] && EVENTS+=",syscalls:sys_enter_$sc"
done

# iperf3 for DURATION s while perf counts both engines; prints one table
profile_test() { # $1 tag, iperf3 arguments after it
  local tag=$1; shift
  local json=$OUTDIR/$tag.json stat=$OUTDIR/$tag.perfstat bytes
  perf stat -x, -e "$EVENTS" -p "$EA,$EB" -o "$stat" -- sleep $((DURATION + 2)) &
  local perf_pid=$!
  sleep 0.5
  ina iperf3 -c 10.99.98.2 -p 5201 -t "$DURATION" -J "$@" > "$json"
  wait "$perf_pid" || true
  if [[ $tag == udp ]]; then
    bytes=$(jq -r '.end.sum | if .packets > 0 then .bytes * (.packets - .lost_packets) / .packets else 0 end' "$json")
  else
    bytes=$(jq -r '.end.sum_received.bytes' "$json")
  fi
  awk -F, -v by="$bytes" -v tag="$tag" -v mtu="$TUN_MTU" -v secs="$DURATION" '
    $3 != "" && $1 ~ /^[0-9.]+$/ { name = $3; sub(/^syscalls:sys_enter_/, "", name); v[name] = $1; order[++n] = name }
    END {
      gb = by / 1e9; pk = by / (mtu - 52)   # packets of TUN_MTU bytes: 52 = IPv4 + TCP headers with timestamps
      printf "%s: %.2f GB received in about %d s (%.2f Gbit/s) by iperf3 through meshd-wg\n", tag, gb, secs, gb * 8 / secs
      printf "  %-22s %14s %12s %10s\n", "event (both engines)", "count", "per GB", "per packet"
      for (i = 1; i <= n; i++) {
        k = order[i]; if (v[k] == 0) continue
        if (k == "task-clock") { printf "  %-22s %13.2fs %11.3fs\n", "CPU time", v[k] / 1000, v[k] / 1000 / gb; continue }
        if (k == "raw_syscalls:sys_enter") k2 = "all syscalls"; else k2 = k
        printf "  %-22s %14d %12.0f %10.3f\n", k2, v[k], v[k] / gb, v[k] / pk
      }
    }' "$stat" | tee -a "$OUTDIR/summary.txt"
}

{
  echo "meshd-wg: $MESHD_WG; kernel $(uname -r), $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "per packet = per $((TUN_MTU - 52)) bytes of TCP payload ($TUN_MTU-byte packets); UDP rows use the same divisor"
} | tee "$OUTDIR/summary.txt"
for s in $STREAMS; do profile_test "tcp$s" -P "$s"; done
[[ $UDP == 1 ]] && profile_test udp -u -b 0 -l $((TUN_MTU - 28))

if [[ $RECORD == 1 ]]; then
  perf record -q -e cpu-clock -F 999 -p "$EA,$EB" -o "$OUTDIR/perf.data" -- sleep $((DURATION + 1)) 2>/dev/null &
  rec_pid=$!
  sleep 0.5
  ina iperf3 -c 10.99.98.2 -p 5201 -t "$DURATION" -J > "$OUTDIR/record-tcp1.json"
  wait "$rec_pid" || true
  report() { # perf report lines without comments and the empty trailing columns
    perf report -i "$OUTDIR/perf.data" --stdio --no-children "$@" 2>/dev/null |
      grep -v '^#' | grep -v '^$' | sed 's/[[:space:]-]*$//'
  }
  {
    echo "CPU samples of both engines, TCP 1 stream (perf record -e cpu-clock), by object:"
    report --sort dso | head -6
    echo "hottest functions ([k] kernel, [.] user space):"
    report --sort symbol --percent-limit 0.8 | head -30
  } | tee -a "$OUTDIR/summary.txt"
fi
echo "profile.sh: results in $OUTDIR" >&2
