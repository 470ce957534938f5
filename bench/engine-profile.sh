#!/bin/bash
# Quick profile of one meshd-wg build: two network namespaces joined by a veth pair, one
# meshd-wg in each (configured with wg, MTU 1420), iperf3 TCP with 1 and 4 streams through the
# tunnel. Prints throughput, retransmits, the two daemons' CPU-seconds per GB, each daemon
# thread's CPU, the kernel's TCP loss/reorder counters and TUN drops; with PERF=stat also the
# daemons' system calls (perf stat), with PERF=record a call-graph profile of the 1-stream run.
# Everything runs in namespaces this script creates and removes; nothing touches the root
# namespace's addresses or routes.
#
#   sudo bench/engine-profile.sh [MESHD_WG_BINARY] [LABEL]
#   DUR=10 PERF=stat|record; MESHD_WG_OFFLOAD=0 / MESHD_WG_UDP_OFFLOAD=0 reach the daemons.
#
# The comparison with boringtun-cli and wireguard-go is bench/run.sh; this is for looking
# inside the engine.
set -eu
BIN=${1:-target/release/meshd-wg}
LABEL=${2:-meshd-wg}
DUR=${DUR:-10}
for tool in ip wg iperf3 python3; do
	command -v $tool >/dev/null || { echo "engine-profile: $tool is missing" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "engine-profile: no executable $BIN (cargo build --release -p meshd-engine)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "engine-profile: needs root (network namespaces)" >&2; exit 1; }
if [ -n "${PERF:-}" ] && ! command -v perf >/dev/null; then
	echo "engine-profile: PERF=$PERF but perf is missing" >&2; exit 1
fi

OUT=$(mktemp -d /tmp/engine-profile.XXXXXX)
A=epA$$ B=epB$$ IA=epa$$ IB=epb$$
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	ip netns del $A 2>/dev/null || true
	ip netns del $B 2>/dev/null || true
}
trap cleanup EXIT

ip netns add $A
ip netns add $B
ip link add v$IA netns $A type veth peer name v$IB netns $B
ip -n $A addr add 10.77.0.1/24 dev v$IA
ip -n $B addr add 10.77.0.2/24 dev v$IB
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set v$IA up
ip -n $B link set v$IB up
ka=$(wg genkey) kb=$(wg genkey)
pa=$(echo "$ka" | wg pubkey) pb=$(echo "$kb" | wg pubkey)
LOG_LEVEL=${LOG_LEVEL:-info} ip netns exec $A "$BIN" -f $IA 2>"$OUT/a.log" &
PA=$!; PIDS+=($PA)
LOG_LEVEL=${LOG_LEVEL:-info} ip netns exec $B "$BIN" -f $IB 2>"$OUT/b.log" &
PB=$!; PIDS+=($PB)
for _ in $(seq 100); do
	[ -S /var/run/wireguard/$IA.sock ] && [ -S /var/run/wireguard/$IB.sock ] && break
	sleep 0.1
done
ip netns exec $A wg set $IA private-key <(echo "$ka") listen-port 51000 \
	peer "$pb" endpoint 10.77.0.2:51000 allowed-ips 10.78.0.2/32
ip netns exec $B wg set $IB private-key <(echo "$kb") listen-port 51000 \
	peer "$pa" endpoint 10.77.0.1:51000 allowed-ips 10.78.0.1/32
ip -n $A addr add 10.78.0.1/24 dev $IA
ip -n $B addr add 10.78.0.2/24 dev $IB
ip -n $A link set $IA mtu 1420 up
ip -n $B link set $IB mtu 1420 up
ip netns exec $A ping -c 3 -i 0.2 -W 2 10.78.0.2 >/dev/null || { echo "engine-profile: no ping through the tunnel" >&2; exit 1; }
grep -h "offloads" "$OUT/a.log" "$OUT/b.log" 2>/dev/null | sed 's/^/  /' || true

cpu() { awk '{print $14+$15}' /proc/$1/stat; }
threads() { for t in /proc/$1/task/*; do echo "$(cat $t/comm)=$(awk '{print $14+$15}' $t/stat)"; done | tr '\n' ' '; }
stat_cpu() { awk '/^cpu /{s=0; for (i=2; i<=NF; i++) s+=$i; print $5+$6, s}' /proc/stat; }
EVENTS=syscalls:sys_enter_sendmmsg,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_poll,syscalls:sys_enter_futex,raw_syscalls:sys_enter
COUNTERS='UdpRcvbufErrors|UdpSndbufErrors|UdpInErrors|TcpRetransSegs|TcpExtTCPLossProbes|TcpExtTCPTimeouts|TcpExtTCPSpuriousRTOs|TcpExtTCPDSACKRecv |TcpExtTCPDSACKOldSent|TcpExtTCPSACKReorder|TcpExtTCPTSReorder|TcpExtTCPOFOQueue'

for P in 1 4; do
	ip netns exec $B iperf3 -s -1 -D >/dev/null 2>&1
	sleep 0.3
	for n in $A $B; do ip netns exec $n nstat -n >/dev/null; done
	ca0=$(cpu $PA) cb0=$(cpu $PB) ta0=$(threads $PA) tb0=$(threads $PB)
	read -r idle0 tot0 < <(stat_cpu)
	PS=
	if [ "${PERF:-}" = stat ]; then
		perf stat -e $EVENTS -p $PA,$PB -o "$OUT/syscalls-$P.txt" -- sleep $((DUR + 1)) & PS=$!
	elif [ "${PERF:-}" = record ] && [ $P = 1 ]; then
		perf record --call-graph dwarf,16384 -F 499 -o "$OUT/perf-$P.data" -p $PA,$PB -- sleep $DUR >/dev/null 2>&1 & PS=$!
	fi
	json=$(ip netns exec $A iperf3 -c 10.78.0.2 -t $DUR -P $P -J)
	[ -n "$PS" ] && wait $PS
	ca1=$(cpu $PA) cb1=$(cpu $PB)
	read -r idle1 tot1 < <(stat_cpu)
	echo "$json" | python3 -c "
import json, sys
e = json.load(sys.stdin)['end']; s = e['sum_sent']; r = e['sum_received']
gb = r['bytes'] / 1e9; cpu = ($ca1 - $ca0 + $cb1 - $cb0) / 100.0
print(f\"$LABEL TCP P=$P: {r['bits_per_second'] / 1e9:.2f} Gbit/s  retransmits={s.get('retransmits')}  \"
      f\"daemons {cpu:.1f} CPU-s = {cpu / gb:.2f} CPU-s/GB  machine idle {100 * ($idle1 - $idle0) / max(1, $tot1 - $tot0):.0f}%\")"
	echo "  threads A (CPU ticks): $ta0-> $(threads $PA)"
	echo "  threads B (CPU ticks): $tb0-> $(threads $PB)"
	for n in $A $B; do
		echo "  $n: $(ip netns exec $n nstat 2>/dev/null | grep -E "$COUNTERS" | awk '{printf "%s=%s ", $1, $2}')"
	done
	echo "  TUN TX dropped: A $(ip -n $A -s link show dev $IA | awk '/TX:/{getline; print $4}')" \
		"B $(ip -n $B -s link show dev $IB | awk '/TX:/{getline; print $4}')"
	if [ -f "$OUT/syscalls-$P.txt" ]; then
		echo "  syscalls: $(grep sys_enter "$OUT/syscalls-$P.txt" | awk '{sub("syscalls:sys_enter_", "", $2); printf "%s=%s ", $2, $1}')"
	fi
done
if [ -f "$OUT/perf-1.data" ]; then
	echo "profile of the 1-stream run: perf report -i $OUT/perf-1.data --no-children --sort sym"
	perf report -i "$OUT/perf-1.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep '%' | head -25
fi
echo "logs and data: $OUT"
