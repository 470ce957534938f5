#!/usr/bin/env bash
# The engine under a handshake flood from an underlay neighbour.
#
#   sudo bench/flood.sh            # DURATION=30 RATE=20000 SOURCES=256 BASELINE=10 COOKIES=1
#
# Builds four network namespaces of its own (names end in this script's PID): A and B run
# meshd-wg (release build) with each other as peer; X is the attacker, on the same underlay
# bridge (in the fourth namespace). A pings B through the tunnel every 10 ms. First for
# BASELINE seconds without a flood, then for DURATION seconds while X sends handshake
# initiations to B's engine with a valid MAC1 for B's public key, each claiming A's public key
# (an attacker knows public keys), from SOURCES addresses of 198.18.0.0/16 and ephemeral
# ports, at RATE datagrams a second (the tool caps it at 50000). With COOKIES=1 (default) a
# third phase repeats the flood as an attacker that owns its source addresses: it decrypts
# B's cookie replies and sends with a valid MAC2 from then on, so only the per-source and
# device-wide handshake budgets stand between it and B's CPU. Everything stays inside the
# namespaces; everything made here is removed on exit, and only processes started here are
# stopped (by PID).
#
# Prints, for each phase: ping loss, RTT p50/p99/max, the CPU seconds of B's engine (the
# target) and of A's, the cookies B sent, and whether B still has A's real endpoint.
#
# BIN_DIR=DIR uses meshd-wg and meshd-wg-flood from DIR instead of building them.
set -euo pipefail

DURATION=${DURATION:-30}
RATE=${RATE:-20000}
SOURCES=${SOURCES:-256}
BASELINE=${BASELINE:-10}
COOKIES=${COOKIES:-1}

[ "$(id -u)" = 0 ] || { echo "flood.sh: needs root (network namespaces)" >&2; exit 2; }
for tool in ip wg ping awk sort; do
    command -v "$tool" >/dev/null || { echo "flood.sh: $tool is missing" >&2; exit 2; }
done
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${BIN_DIR:-}" ]; then
    (cd "$here" && cargo build --release -p meshd-engine --bins >&2)
    BIN_DIR=${CARGO_TARGET_DIR:-$here/target}/release
fi
ENGINE=$BIN_DIR/meshd-wg
FLOOD=$BIN_DIR/meshd-wg-flood
[ -x "$ENGINE" ] && [ -x "$FLOOD" ] || { echo "flood.sh: no meshd-wg/meshd-wg-flood in $BIN_DIR" >&2; exit 2; }

id=$$
NA=fla$id NB=flb$id NX=flx$id NBR=flr$id
IA=wgfa$id IB=wgfb$id
work=$(mktemp -d)
pids=()

cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    for n in $NA $NB $NX $NBR; do ip netns del "$n" 2>/dev/null; done
    rm -f "/var/run/wireguard/$IA.sock" "/var/run/wireguard/$IB.sock"
    rm -rf "$work"
}
trap cleanup EXIT

in_ns() { local n=$1; shift; ip netns exec "$n" "$@"; }

# --- underlay: a bridge in its own namespace, one veth per host
for n in $NA $NB $NX $NBR; do ip netns add "$n"; in_ns "$n" ip link set lo up; done
in_ns $NBR ip link add br0 type bridge
in_ns $NBR ip link set br0 up
i=1
for n in $NA $NB $NX; do
    ip link add u0 netns "$n" type veth peer name p$i netns $NBR
    in_ns $NBR ip link set p$i master br0 up
    in_ns "$n" ip addr add 192.0.2.$i/24 dev u0
    in_ns "$n" ip link set u0 up
    i=$((i + 1))
done
# The attacker's addresses: local to X; A and B route them to X (cookie replies go back there).
in_ns $NX ip route add local 198.18.0.0/16 dev lo
in_ns $NA ip route add 198.18.0.0/16 via 192.0.2.3
in_ns $NB ip route add 198.18.0.0/16 via 192.0.2.3

# --- the engines
(umask 077; wg genkey > "$work/a.key"; wg genkey > "$work/b.key")
PA=$(wg pubkey < "$work/a.key"); PB=$(wg pubkey < "$work/b.key")
# `ip netns exec` run directly (not through a function) so that $! is the engine itself.
LOG_LEVEL=info ip netns exec $NA "$ENGINE" -f $IA > /dev/null 2> "$work/a.log" & pids+=($!); ENGINE_A=$!
LOG_LEVEL=info ip netns exec $NB "$ENGINE" -f $IB > /dev/null 2> "$work/b.log" & pids+=($!); ENGINE_B=$!
for s in $IA $IB; do
    for _ in $(seq 100); do [ -S /var/run/wireguard/$s.sock ] && break; sleep 0.1; done
    [ -S /var/run/wireguard/$s.sock ] || { echo "flood.sh: engine $s did not start" >&2; exit 1; }
done
in_ns $NA wg set $IA listen-port 51820 private-key "$work/a.key" \
    peer "$PB" endpoint 192.0.2.2:51820 allowed-ips 10.201.0.2/32
in_ns $NB wg set $IB listen-port 51820 private-key "$work/b.key" \
    peer "$PA" endpoint 192.0.2.1:51820 allowed-ips 10.201.0.1/32
in_ns $NA ip addr add 10.201.0.1/24 dev $IA; in_ns $NA ip link set $IA up
in_ns $NB ip addr add 10.201.0.2/24 dev $IB; in_ns $NB ip link set $IB up
for _ in $(seq 40); do in_ns $NA ping -c1 -W1 10.201.0.2 >/dev/null 2>&1 && break; done
in_ns $NA ping -c1 -W1 10.201.0.2 >/dev/null || { echo "flood.sh: no tunnel" >&2; exit 1; }

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
endpoint_at_b() { in_ns $NB wg show $IB endpoints | awk '{print $2}'; }
# B's latest logged total of one counter (the engine logs them every 5 s when they change).
total() {
    { grep -o "$1=[0-9]*" "$work/b.log" || true; } | tail -1 | cut -d= -f2
}

# One phase: ping every 10 ms for $2 seconds (baseline: no flood; flood; cookies: the flood
# with cookies); print figures.
phase() {
    local name=$1 secs=$2
    local ca0 cb0 ca1 cb1 c0 c1
    c0=$(total cookies_sent); c0=${c0:-0}
    local p0; p0=$(total processed); p0=${p0:-0}
    local r0; r0=$(( $(total rate_limited || true) + $(total busy || true) + 0 ))
    ca0=$(cpu $ENGINE_A); cb0=$(cpu $ENGINE_B)
    if [ "$name" != baseline ]; then
        local wc=0; [ "$name" = cookies ] && wc=1
        ip netns exec $NX "$FLOOD" flood --target 192.0.2.2:51820 --target-key "$PB" --claim-key "$PA" \
            --sources "$SOURCES" --rate "$RATE" --duration "$secs" --with-cookies $wc \
            > "$work/$name.out" &
        pids+=($!); local fpid=$!
    fi
    in_ns $NA ping -i 0.01 -W 1 -w "$secs" 10.201.0.2 > "$work/$name.ping" 2>&1 || true
    ca1=$(cpu $ENGINE_A); cb1=$(cpu $ENGINE_B)
    [ "$name" != baseline ] && wait "$fpid"
    # The engine logs its totals every 5 s.
    sleep 6
    c1=$(total cookies_sent); c1=${c1:-0}
    local p1; p1=$(total processed); p1=${p1:-0}
    local r1; r1=$(( $(total rate_limited || true) + $(total busy || true) + 0 ))
    local summary
    summary=$(grep -E 'packets transmitted' "$work/$name.ping")
    grep -o 'time=[0-9.]*' "$work/$name.ping" | cut -d= -f2 | sort -n > "$work/$name.rtt"
    local n
    n=$(wc -l < "$work/$name.rtt")
    pct() { [ "$n" -gt 0 ] && sed -n "$(( (n * $1 + 99) / 100 ))p" "$work/$name.rtt" || echo -; }
    echo "== $name ($secs s)"
    echo "ping (10 ms interval): $summary"
    echo "rtt_ms p50=$(pct 50) p99=$(pct 99) max=$(tail -1 "$work/$name.rtt")"
    awk -v a0="$ca0" -v a1="$ca1" -v b0="$cb0" -v b1="$cb1" -v hz="$hz" -v s="$secs" 'BEGIN {
        printf "engine_cpu_seconds target(B)=%.2f (%.0f%% of a core) peer(A)=%.2f\n",
            (b1-b0)/hz, 100*(b1-b0)/hz/s, (a1-a0)/hz }'
    echo "cookies_sent_by_B=$((c1 - c0)) handshakes_processed_by_B=$((p1 - p0)) (Diffie-Hellman work) refused_by_the_budgets=$((r1 - r0))"
    if [ "$name" != baseline ]; then sed 's/^/flooder: /' "$work/$name.out"; fi
    echo "B's endpoint for A: $(endpoint_at_b) (expected 192.0.2.1:51820); endpoint moves logged by B: $(total endpoint_moves)"
}

echo "meshd-wg flood benchmark: rate=$RATE/s sources=$SOURCES duration=${DURATION}s, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$BASELINE" -gt 0 ] && phase baseline "$BASELINE"
phase flood "$DURATION"
[ "$COOKIES" = 1 ] && phase cookies "$DURATION"
{ grep -h 'under load\|handshake gate totals' "$work/b.log" || true; } | tail -3 | sed 's/^/B log: /'
