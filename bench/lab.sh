#!/usr/bin/env bash
# lab.sh - userspace WireGuard data plane, side by side, between two network namespaces.
# Normally started by bench/run.sh, which installs the tools and builds meshd-wg.
#
#   ns A (veth 192.0.2.1/24)  <---- veth ---->  ns B (veth 192.0.2.2/24)
#   ns A (wg   10.99.99.1/24) <- WireGuard ->   ns B (wg   10.99.99.2/24)
#
# Each round: the one-core ChaCha20-Poly1305 limit (openssl speed), the bare veth, then every
# implementation in IMPL (order reversed on even rounds), each measured with iperf3 TCP (1 and 4
# streams), iperf3 UDP (1392-byte payloads = 1420-byte packets inside the tunnel, unlimited
# rate) and ping. All traffic stays inside the two namespaces this script creates (their names
# and the interface names end in this script's PID); on exit, error or Ctrl-C every process
# started here is stopped by PID, both namespaces are deleted and the UAPI sockets and keys
# made here are removed.
#
# Environment:
#   IMPL        space-separated list of: meshd-wg boringtun wireguard-go
#   MESHD_WG    path of meshd-wg (run as `meshd-wg -f IFACE`)
#   BORINGTUN   path of boringtun-cli;  WGGO  path of wireguard-go
#   ROUNDS (3)  DURATION (10 s per iperf3 test)  STREAMS ("1 4")  UDP (1: run the UDP test)
#   PINGS (200) PING_INTERVAL (0.01 s)  TUN_MTU (1420)  VETH (1: measure the bare veth too)
#   CRYPTO_SECONDS (3: per openssl speed run; 0 skips the crypto limit)
#   BT_THREADS  boringtun --threads (4 = boringtun-cli's default)
#   QUIET_BUSY_PCT (15) / QUIET_MAX_WAIT (5 s): before each iperf3 test wait, at most
#               QUIET_MAX_WAIT s, until the whole machine is less than QUIET_BUSY_PCT busy
#   OUTDIR      results directory (raw.tsv, summary.md, iperf3 JSON, ping output, daemon logs)
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMPL="${IMPL:-meshd-wg boringtun wireguard-go}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
STREAMS="${STREAMS:-1 4}"
UDP="${UDP:-1}"
PINGS="${PINGS:-200}"
PING_INTERVAL="${PING_INTERVAL:-0.01}"
TUN_MTU="${TUN_MTU:-1420}"
VETH="${VETH:-1}"
CRYPTO_SECONDS="${CRYPTO_SECONDS:-3}"
QUIET_BUSY_PCT="${QUIET_BUSY_PCT:-15}"
QUIET_MAX_WAIT="${QUIET_MAX_WAIT:-5}"
BT_THREADS="${BT_THREADS:-4}"
MESHD_WG="${MESHD_WG:-}"
BORINGTUN="${BORINGTUN:-$(command -v boringtun-cli || true)}"
WGGO="${WGGO:-$(command -v wireguard-go || true)}"
OUTDIR="${OUTDIR:-${TMPDIR:-/tmp}/meshd-bench/$(date +%Y%m%d-%H%M%S)}"
UDP_LEN=$((TUN_MTU - 28))    # UDP payload that makes a TUN_MTU-byte IPv4 packet

ID=$$
NS_A=bna$ID; NS_B=bnb$ID
UL_A=192.0.2.1; UL_B=192.0.2.2          # underlay (veth)
TUN_A=10.99.99.1; TUN_B=10.99.99.2      # overlay (WireGuard)
WG_A=wgba$ID; WG_B=wgbb$ID              # interface names (also UAPI socket names)
PORT_A=51820; PORT_B=51821
SOCKDIR=/var/run/wireguard
CLK_TCK=$(getconf CLK_TCK)
PGRP=$(awk '{ sub(/^.*\) /, ""); print $3 }' /proc/$$/stat)   # our process group (not "foreign" CPU)

declare -a PIDS=()        # every background process started here
CREATED_NS=0
KEYDIR=""

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
kill_pid() {   # stop one of our PIDs (TERM, then KILL after 3 s) and forget it
  local pid=$1 i
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "pid $pid ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill_pid "$p"; done
  rm -f "$SOCKDIR/$WG_A.sock" "$SOCKDIR/$WG_B.sock"
  if [[ $CREATED_NS == 1 ]]; then
    # safety net: anything still running inside OUR namespaces was started here; stop it by PID
    local left; left=$( { ip netns pids "$NS_A"; ip netns pids "$NS_B"; } 2>/dev/null | sort -u)
    if [[ -n "$left" ]]; then
      log "stopping leftover pids in $NS_A/$NS_B: $(echo $left)"
      for p in $left; do kill -TERM "$p" 2>/dev/null; done; sleep 0.5
      for p in $left; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
    fi
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
  fi
  [[ -n "$KEYDIR" ]] && rm -rf "$KEYDIR"
  rm -f "$OUTDIR/.snap0" "$OUTDIR/.snap1"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
ina() { ip netns exec "$NS_A" "$@"; }
inb() { ip netns exec "$NS_B" "$@"; }
rec() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUTDIR/raw.tsv"; }   # round impl metric value

proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }   # utime+stime, all threads
sys_busy() { awk '/^cpu /{ t=0; for(i=2;i<=9;i++) t+=$i; print t-$5-$6, t }' /proc/stat; }  # busy total

drop_counters() { # "udp_rcvbuf_errors udp_sndbuf_errors tun_tx_dropped", summed over both namespaces
  local ns ifc rb=0 sb=0 td=0 a b c
  for ns in "$NS_A" "$NS_B"; do
    [[ $ns == "$NS_A" ]] && ifc=$WG_A || ifc=$WG_B
    read -r a b < <(ip netns exec "$ns" awk '/^Udp:/{ if (!h) { for(i=2;i<=NF;i++) n[$i]=i; h=1 } else print $n["RcvbufErrors"], $n["SndbufErrors"] }' /proc/net/snmp)
    c=$(ip netns exec "$ns" cat "/sys/class/net/$ifc/statistics/tx_dropped" 2>/dev/null || echo 0)
    rb=$((rb + a)); sb=$((sb + b)); td=$((td + c))
  done
  echo "$rb $sb $td"
}

preflight() {
  [[ $EUID -eq 0 ]] || die "must run as root (network namespaces)"
  local c; for c in ip wg iperf3 ping awk python3 jq; do command -v "$c" >/dev/null || die "missing: $c"; done
  [[ $CRYPTO_SECONDS == 0 ]] || command -v openssl >/dev/null || die "missing: openssl"
  [[ -c /dev/net/tun ]] || die "/dev/net/tun missing"
  local i; for i in $IMPL; do
    case $i in
      meshd-wg)     [[ -x "$MESHD_WG" ]] || die "meshd-wg not found (set MESHD_WG)" ;;
      wireguard-go) [[ -x "$WGGO" ]] || die "wireguard-go not found (apt-get install wireguard-go, or set WGGO)" ;;
      boringtun)    [[ -x "$BORINGTUN" ]] || die "boringtun-cli not found (set BORINGTUN)" ;;
      *) die "unknown IMPL '$i' (meshd-wg|boringtun|wireguard-go)" ;;
    esac
  done
}

setup_netns() {
  log "creating namespaces $NS_A/$NS_B"
  ip netns add "$NS_A"; CREATED_NS=1
  ip netns add "$NS_B"
  ip link add veth0 netns "$NS_A" type veth peer name veth0 netns "$NS_B"
  ina ip link set lo up; inb ip link set lo up
  ina ip addr add "$UL_A/24" dev veth0; inb ip addr add "$UL_B/24" dev veth0
  ina ip link set veth0 up; inb ip link set veth0 up
  local i
  for i in $(seq 50); do ina ping -c 1 -W 1 "$UL_B" >/dev/null 2>&1 && break; sleep 0.1; done
  ina ping -c 1 -W 1 "$UL_B" >/dev/null || die "veth ping failed"
  # one iperf3 server in B serves the veth and the tunnel tests; `ip netns exec` is started
  # directly (not through inb) so that $! is the iperf3 process itself
  ip netns exec "$NS_B" iperf3 -s -p 5201 > "$OUTDIR/iperf3-server.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 50); do inb iperf3 -c "$UL_B" -p 5201 -t 1 -n 1K >/dev/null 2>&1 && break; sleep 0.1; done
}

WG_PIDS=()
start_wg() {   # $1 impl $2 round
  local impl=$1 r=$2 ns ifc pid side i
  WG_PIDS=()
  for side in a b; do
    if [[ $side == a ]]; then ns=$NS_A; ifc=$WG_A; else ns=$NS_B; ifc=$WG_B; fi
    case $impl in
      meshd-wg)
        LOG_LEVEL=warn ip netns exec "$ns" "$MESHD_WG" -f "$ifc" > "$OUTDIR/r$r-$impl-$side.log" 2>&1 & ;;
      wireguard-go)
        WG_PROCESS_FOREGROUND=1 ip netns exec "$ns" "$WGGO" -f "$ifc" > "$OUTDIR/r$r-$impl-$side.log" 2>&1 & ;;
      boringtun)
        WG_SUDO=1 ip netns exec "$ns" "$BORINGTUN" --foreground --disable-drop-privileges \
          --threads "$BT_THREADS" --verbosity error "$ifc" > "$OUTDIR/r$r-$impl-$side.log" 2>&1 & ;;
    esac
    pid=$!; PIDS+=("$pid"); WG_PIDS+=("$pid")
  done
  for i in $(seq 100); do
    [[ -S "$SOCKDIR/$WG_A.sock" && -S "$SOCKDIR/$WG_B.sock" ]] && break
    for pid in "${WG_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || die "$impl exited early, see $OUTDIR/r$r-$impl-*.log"; done
    sleep 0.1
  done
  [[ -S "$SOCKDIR/$WG_A.sock" && -S "$SOCKDIR/$WG_B.sock" ]] || die "$impl: UAPI sockets did not appear"

  ina wg set "$WG_A" listen-port $PORT_A private-key "$KEYDIR/a.key" \
      peer "$(cat "$KEYDIR/b.pub")" endpoint "$UL_B:$PORT_B" allowed-ips "$TUN_B/32"
  inb wg set "$WG_B" listen-port $PORT_B private-key "$KEYDIR/b.key" \
      peer "$(cat "$KEYDIR/a.pub")" endpoint "$UL_A:$PORT_A" allowed-ips "$TUN_A/32"
  ina ip addr add "$TUN_A/24" dev "$WG_A"; inb ip addr add "$TUN_B/24" dev "$WG_B"
  ina ip link set "$WG_A" mtu "$TUN_MTU" up; inb ip link set "$WG_B" mtu "$TUN_MTU" up
  # handshake, then warm-up (boringtun re-reads the MTU once a second)
  local ok=0
  for i in $(seq 20); do ina ping -c 1 -W 1 "$TUN_B" >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
  [[ $ok == 1 ]] || die "$impl: no connectivity over the tunnel"
  sleep 1.5
  ina ping -c 5 -i 0.05 -q "$TUN_B" >/dev/null 2>&1 || true
}

stop_wg() {
  local pid i
  for pid in "${WG_PIDS[@]+"${WG_PIDS[@]}"}"; do kill_pid "$pid"; done
  WG_PIDS=()
  rm -f "$SOCKDIR/$WG_A.sock" "$SOCKDIR/$WG_B.sock"
  for i in $(seq 30); do
    ina ip link show "$WG_A" >/dev/null 2>&1 || inb ip link show "$WG_B" >/dev/null 2>&1 || break; sleep 0.1
  done
}

wait_quiet() { # wait (at most QUIET_MAX_WAIT s) until the machine is less than QUIET_BUSY_PCT busy over 1 s
  local waited=0 b0 t0 b1 t1 busy
  (( QUIET_MAX_WAIT > 0 )) || return 0
  while :; do
    read -r b0 t0 < <(sys_busy); sleep 1; read -r b1 t1 < <(sys_busy)
    busy=$(( t1 > t0 ? 100 * (b1 - b0) / (t1 - t0) : 0 ))
    (( busy < QUIET_BUSY_PCT )) && break
    (( waited >= QUIET_MAX_WAIT )) && break
    waited=$((waited + 1))
  done
  (( waited > 0 )) && rec "$1" "$2" "${3}_waited_quiet_s" "$waited"
  return 0
}

# One iperf3 test with CPU and drop accounting around it.
# $1 round $2 impl $3 dst $4 tag (tcp1, tcp4, udp) $5... iperf3 arguments
measure_iperf() {
  local r=$1 impl=$2 dst=$3 tag=$4; shift 4
  local json="$OUTDIR/r$r-$impl-$tag.json"
  local t0 t1 b0 b1 tot0 tot1 w0=0 w1=0 pid d0 d1
  wait_quiet "$r" "$impl" "$tag"
  d0=$(drop_counters)
  python3 "$HERE/cpu_foreign.py" snap "$PGRP" "$OUTDIR/.snap0"
  for pid in "${WG_PIDS[@]+"${WG_PIDS[@]}"}"; do w0=$((w0 + $(proc_ticks "$pid"))); done
  read -r b0 tot0 < <(sys_busy); t0=$(date +%s.%N)
  if ! timeout $((DURATION + 20)) ip netns exec "$NS_A" iperf3 -c "$dst" -p 5201 -t "$DURATION" -J "$@" > "$json" 2> "${json%.json}.stderr"; then
    log "  iperf3 $impl $tag round $r FAILED (see $json)"; rec "$r" "$impl" "${tag}_failed" 1; return 0
  fi
  t1=$(date +%s.%N); read -r b1 tot1 < <(sys_busy)
  python3 "$HERE/cpu_foreign.py" snap "$PGRP" "$OUTDIR/.snap1"
  for pid in "${WG_PIDS[@]+"${WG_PIDS[@]}"}"; do w1=$((w1 + $(proc_ticks "$pid"))); done
  d1=$(drop_counters)
  local x0 y0 z0 x1 y1 z1; read -r x0 y0 z0 <<<"$d0"; read -r x1 y1 z1 <<<"$d1"
  local wall syscpu bytes line
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
  syscpu=$(awk -v d="$((b1-b0))" -v t="$((tot1-tot0))" 'BEGIN{printf "%.1f", (t>0? 100*d/t : 0)}')
  if [[ $tag == udp ]]; then
    # receiver-side figures; iperf3 3.12 puts the server's count in .end.sum (lost = sent - received)
    local pk lost secs pps losspct
    read -r pk lost secs bytes < <(jq -r '.end.sum | "\(.packets) \(.lost_packets) \(.seconds) \(.bytes)"' "$json")
    pps=$(awk -v p="$pk" -v l="$lost" -v s="$secs" 'BEGIN{printf "%.0f", (s>0? (p-l)/s : 0)}')
    losspct=$(awk -v p="$pk" -v l="$lost" 'BEGIN{printf "%.2f", (p>0? 100*l/p : 0)}')
    bytes=$(awk -v b="$bytes" -v p="$pk" -v l="$lost" 'BEGIN{printf "%.0f", (p>0? b*(p-l)/p : 0)}')
    rec "$r" "$impl" udp_kpps "$(awk -v p="$pps" 'BEGIN{printf "%.1f", p/1000}')"
    rec "$r" "$impl" udp_loss_pct "$losspct"
    line="$((pps / 1000)) kpps received, loss ${losspct}%"
  else
    local bps retr gbps
    bps=$(jq -r '.end.sum_received.bits_per_second' "$json")
    bytes=$(jq -r '.end.sum_received.bytes' "$json")
    retr=$(jq -r '.end.sum_sent.retransmits // 0' "$json")
    gbps=$(awk -v b="$bps" 'BEGIN{printf "%.3f", b/1e9}')
    rec "$r" "$impl" "${tag}_gbps" "$gbps"
    rec "$r" "$impl" "${tag}_retrans" "$retr"
    line="${gbps} Gbit/s, retransmits $retr"
  fi
  rec "$r" "$impl" "${tag}_sys_busy_pct" "$syscpu"
  local fcpu ftop ours
  read -r fcpu ftop < <(python3 "$HERE/cpu_foreign.py" diff "$OUTDIR/.snap0" "$OUTDIR/.snap1" "$wall")
  # cutime of a reaped long-lived child can exceed the window: cap at machine busy minus the daemons
  ours=$(awk -v d="$((w1-w0))" -v hz="$CLK_TCK" -v w="$wall" 'BEGIN{printf "%.1f", 100*d/hz/w}')
  fcpu=$(awk -v f="$fcpu" -v s="$syscpu" -v n="$(nproc)" -v o="$ours" 'BEGIN{ c=s*n-o; if (c<0) c=0; printf "%.1f", (f>c? c : f) }')
  rec "$r" "$impl" "${tag}_foreign_cpu_pct" "$fcpu"
  echo "r$r $impl $tag foreign=${fcpu}% top: $ftop" >> "$OUTDIR/foreign-cpu.log"
  rec "$r" "$impl" "${tag}_udp_rcvbuf_drops" "$((x1 - x0))"
  rec "$r" "$impl" "${tag}_tun_tx_drops" "$((z1 - z0))"
  local extra=""
  if [[ ${#WG_PIDS[@]} -gt 0 ]]; then
    local spg
    spg=$(awk -v d="$((w1-w0))" -v hz="$CLK_TCK" -v by="$bytes" 'BEGIN{printf "%.3f", (by>0? (d/hz)/(by/1e9) : 0)}')
    rec "$r" "$impl" "${tag}_wg_cpu_pct" "$ours"
    rec "$r" "$impl" "${tag}_cpu_s_per_GB" "$spg"
    extra=", daemons ${ours}% CPU = ${spg} CPU-s/GB"
  fi
  log "  $impl $tag: $line$extra, drops rcvbuf=$((x1 - x0)) tun=$((z1 - z0)), foreign CPU ${fcpu}%"
}

measure_ping() {  # $1 round $2 impl $3 dst
  local r=$1 impl=$2 dst=$3 f="$OUTDIR/r$1-$2.ping" stats avg p50 p99 lost
  ip netns exec "$NS_A" ping -c "$PINGS" -i "$PING_INTERVAL" -W 1 "$dst" > "$f" 2>&1 || true
  stats=$(grep -o 'time=[0-9.]*' "$f" | cut -d= -f2 | sort -g | awk -v n="$PINGS" '
      { v[NR]=$1; s+=$1 }
      END { if (NR==0) { print "nan nan nan " n; exit }
            k=int(0.99*NR); if (k<0.99*NR) k++; if (k<1) k=1;       # nearest-rank p99
            m=int(0.5*NR);  if (m<0.5*NR) m++;  if (m<1) m=1;
            printf "%.4f %.4f %.4f %d\n", s/NR, v[m], v[k], n-NR }')
  read -r avg p50 p99 lost <<<"$stats"
  rec "$r" "$impl" ping_p50_ms "$p50"; rec "$r" "$impl" ping_p99_ms "$p99"; rec "$r" "$impl" ping_lost "$lost"
  log "  $impl ping: p50=${p50} p99=${p99} ms, lost $lost of $PINGS"
}

measure_set() { # $1 round $2 impl $3 dst
  local s
  for s in $STREAMS; do measure_iperf "$1" "$2" "$3" "tcp$s" -P "$s"; done
  [[ $UDP == 1 ]] && measure_iperf "$1" "$2" "$3" udp -u -b 0 -l "$UDP_LEN"
  measure_ping "$1" "$2" "$3"
}

# The one-core ChaCha20-Poly1305 limit: OpenSSL's EVP encrypt and decrypt of TUN_MTU-byte
# buffers (openssl speed divides by user CPU time, so this is per CPU-second), and what it means
# for a tunnel: every payload byte is encrypted once and decrypted once, so both daemons together
# need at least 1/enc + 1/dec CPU-seconds per GB for the cipher alone.
measure_crypto() { # $1 round
  local r=$1 enc dec
  (( CRYPTO_SECONDS > 0 )) || return 0
  speed() {
    openssl speed -seconds "$CRYPTO_SECONDS" -bytes "$TUN_MTU" "$@" -evp chacha20-poly1305 2>/dev/null |
      awk '/^[Cc]ha[Cc]ha20-[Pp]oly1305/ { for (i=NF; i>0; i--) if ($i ~ /^[0-9.]+k$/) { v=$i; sub(/k$/,"",v); print v*1000; exit } }'
  }
  enc=$(speed); dec=$(speed -decrypt)
  [[ -n $enc && -n $dec ]] || { log "  openssl speed gave no figure"; rec "$r" crypto failed 1; return 0; }
  rec "$r" crypto enc_gbps "$(awk -v b="$enc" 'BEGIN{printf "%.3f", b*8/1e9}')"
  rec "$r" crypto dec_gbps "$(awk -v b="$dec" 'BEGIN{printf "%.3f", b*8/1e9}')"
  rec "$r" crypto cpu_s_per_GB "$(awk -v e="$enc" -v d="$dec" 'BEGIN{printf "%.3f", 1e9/e + 1e9/d}')"
  log "  crypto (one core, ${TUN_MTU} B): encrypt $(awk -v b="$enc" 'BEGIN{printf "%.2f", b*8/1e9}') Gbit/s, decrypt $(awk -v b="$dec" 'BEGIN{printf "%.2f", b*8/1e9}') Gbit/s = $(awk -v e="$enc" -v d="$dec" 'BEGIN{printf "%.3f", 1e9/e + 1e9/d}') CPU-s/GB (encrypt+decrypt)"
}

# ---------------------------------------------------------------- main
preflight
mkdir -p "$OUTDIR"
: > "$OUTDIR/raw.tsv"
KEYDIR=$(mktemp -d "${TMPDIR:-/tmp}/meshd-bench-keys.XXXXXX"); chmod 700 "$KEYDIR"
( umask 077; wg genkey > "$KEYDIR/a.key"; wg genkey > "$KEYDIR/b.key" )
wg pubkey < "$KEYDIR/a.key" > "$KEYDIR/a.pub"; wg pubkey < "$KEYDIR/b.key" > "$KEYDIR/b.pub"

{
  echo "date: $(date -Is)"
  echo "kernel: $(uname -r), $(nproc) CPUs:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "iperf3: $(iperf3 --version | head -1); $(openssl version 2>/dev/null || true)"
  for i in $IMPL; do
    case $i in
      meshd-wg) echo "meshd-wg: $MESHD_WG" ;;
      wireguard-go) echo "wireguard-go: $("$WGGO" --version 2>&1 | head -1) ($WGGO)" ;;
      boringtun) echo "boringtun-cli: $("$BORINGTUN" --version) ($BORINGTUN, --threads $BT_THREADS)" ;;
    esac
  done
  echo "IMPL='$IMPL' ROUNDS=$ROUNDS DURATION=$DURATION STREAMS='$STREAMS' UDP=$UDP (payload $UDP_LEN B) PINGS=$PINGS PING_INTERVAL=$PING_INTERVAL TUN_MTU=$TUN_MTU CRYPTO_SECONDS=$CRYPTO_SECONDS QUIET_MAX_WAIT=$QUIET_MAX_WAIT"
} | tee "$OUTDIR/env.txt" >&2

setup_netns
read -r -a IMPLS <<<"$IMPL"
for r in $(seq "$ROUNDS"); do
  order=("${IMPLS[@]}")
  if (( r % 2 == 0 )); then
    order=(); for ((i=${#IMPLS[@]}-1; i>=0; i--)); do order+=("${IMPLS[i]}"); done
  fi
  log "=== round $r/$ROUNDS: ${order[*]}"
  measure_crypto "$r"
  WG_PIDS=()
  [[ $VETH == 1 ]] && measure_set "$r" veth "$UL_B"
  for impl in "${order[@]}"; do
    log "--- $impl"
    start_wg "$impl" "$r"
    measure_set "$r" "$impl" "$TUN_B"
    ina wg show "$WG_A" > "$OUTDIR/r$r-$impl-wgshow.txt" 2>&1 || true
    stop_wg
  done
done

python3 "$HERE/summarize.py" "$OUTDIR/raw.tsv" | tee "$OUTDIR/summary.md"
log "results in $OUTDIR"
