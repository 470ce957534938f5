#!/usr/bin/env bash
# run.sh - the data-plane benchmark in one command: meshd-wg, boringtun-cli 0.7.1 and
# wireguard-go (Debian) alternately in one run, plus the one-core ChaCha20-Poly1305 limit.
#
#   sudo bench/run.sh            # 3 rounds of 10 s per test, about 11 minutes
#   sudo bench/run.sh --smoke    # meshd-wg only, 1 round of 2 s: checks the bench end to end
#
# What it needs it installs: the Debian packages (wireguard-tools wireguard-go iperf3
# iputils-ping jq openssl python3, through apt-get, only when one is missing), boringtun-cli
# 0.7.1 (cargo install --locked into BENCH_CACHE, once) and meshd-wg (cargo build --release).
# Then it runs bench/lab.sh, prints the summary table and checks that every implementation
# produced every figure (exit status 1 if not). Knobs are lab.sh's environment variables
# (ROUNDS, DURATION, IMPL, ...); BENCH_CACHE (default ~/.cache/meshd-bench) holds boringtun-cli;
# MESHD_WG / BORINGTUN / WGGO use the given binaries instead.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SMOKE=0
for a in "$@"; do
  case $a in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$a' (--smoke or --help)" >&2; exit 2 ;;
  esac
done
[[ $EUID -eq 0 ]] || { echo "run.sh: needs root (network namespaces, TUN devices)" >&2; exit 2; }

if [[ $SMOKE == 1 ]]; then
  export IMPL=${IMPL:-meshd-wg} ROUNDS=${ROUNDS:-1} DURATION=${DURATION:-2} PINGS=${PINGS:-20}
  export CRYPTO_SECONDS=${CRYPTO_SECONDS:-1} VETH=${VETH:-0} QUIET_MAX_WAIT=${QUIET_MAX_WAIT:-0}
fi
export IMPL=${IMPL:-meshd-wg boringtun wireguard-go}

# --- Debian packages, only the missing ones
need=()
for pair in ip:iproute2 wg:wireguard-tools iperf3:iperf3 ping:iputils-ping jq:jq openssl:openssl python3:python3; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [[ " $IMPL " == *" wireguard-go "* && -z "${WGGO:-}" ]] && ! command -v wireguard-go >/dev/null; then
  need+=(wireguard-go)
fi
if ((${#need[@]})); then
  echo "run.sh: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi

# --- boringtun-cli 0.7.1, built once into the cache
if [[ " $IMPL " == *" boringtun "* && -z "${BORINGTUN:-}" ]]; then
  BENCH_CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshd-bench}
  export BORINGTUN=$BENCH_CACHE/boringtun-0.7.1/bin/boringtun-cli
  if [[ ! -x $BORINGTUN ]]; then
    echo "run.sh: building boringtun-cli 0.7.1 into $BENCH_CACHE (once)" >&2
    cargo install boringtun-cli --version 0.7.1 --locked --root "$BENCH_CACHE/boringtun-0.7.1" >&2
  fi
fi

# --- meshd-wg, release build
if [[ " $IMPL " == *" meshd-wg "* && -z "${MESHD_WG:-}" ]]; then
  (cd "$ROOT" && cargo build --release -p meshd-engine --bin meshd-wg >&2)
  export MESHD_WG=${CARGO_TARGET_DIR:-$ROOT/target}/release/meshd-wg
fi

export OUTDIR=${OUTDIR:-${TMPDIR:-/tmp}/meshd-bench/$(date +%Y%m%d-%H%M%S)}
started=$(date +%s)
"$HERE/lab.sh"

# --- every implementation measured gave every figure
raw=$OUTDIR/raw.tsv
fail=0
for impl in $IMPL; do
  for m in tcp1_gbps tcp4_gbps udp_kpps ping_p50_ms ping_p99_ms tcp1_cpu_s_per_GB tcp4_cpu_s_per_GB; do
    case $m in tcp1_*) [[ " ${STREAMS:-1 4} " == *" 1 "* ]] || continue ;; tcp4_*) [[ " ${STREAMS:-1 4} " == *" 4 "* ]] || continue ;;
               udp_*) [[ ${UDP:-1} == 1 ]] || continue ;; esac
    awk -F'\t' -v i="$impl" -v m="$m" '$2 == i && $3 == m && $4 + 0 > 0 { ok = 1 } END { exit !ok }' "$raw" ||
      { echo "run.sh: FAILED: $impl gave no $m" >&2; fail=1; }
  done
done
if awk -F'\t' '$3 ~ /_failed$/ { bad = 1 } END { exit !bad }' "$raw"; then
  echo "run.sh: FAILED: a test failed:" >&2; awk -F'\t' '$3 ~ /_failed$/' "$raw" >&2; fail=1
fi
if [[ ${CRYPTO_SECONDS:-3} != 0 ]]; then
  awk -F'\t' '$2 == "crypto" && $3 == "cpu_s_per_GB" && $4 + 0 > 0 { ok = 1 } END { exit !ok }' "$raw" ||
    { echo "run.sh: FAILED: no crypto limit" >&2; fail=1; }
fi
verdict=ok; [[ $fail == 0 ]] || verdict=FAILED
echo "run.sh: $verdict after $(( $(date +%s) - started )) s; results in $OUTDIR" >&2
exit "$fail"
