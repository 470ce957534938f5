#!/usr/bin/env python3
"""Summarize lab.sh's raw.tsv (round, impl, metric, value) as a markdown table.

Each cell: median [min-max] over the rounds. Ratio columns: for every round, the value of
meshd-wg divided by the value of the reference implementation measured in the same round
(REF, default boringtun, and wireguard-go), then the median [min-max] of those per-round
ratios: both ran back to back in the same round, so drifts of the shared machine cancel.
CPU-s/GB rows also get a ratio against the crypto limit measured in the same round.
Usage: summarize.py raw.tsv
"""
import collections
import math
import os
import statistics
import sys

REF = os.environ.get("REF", "boringtun")
SUBJECT = os.environ.get("SUBJECT", "meshd-wg")

data = collections.defaultdict(dict)  # (impl, metric) -> {round: value}
for line in open(sys.argv[1]):
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 4:
        continue
    r, impl, metric, val = parts
    try:
        data[(impl, metric)][r] = float(val)
    except ValueError:
        pass

impls = [i for i in ("meshd-wg", "boringtun", "wireguard-go", "veth") if any(k[0] == i for k in data)]
refs = [i for i in (REF, "wireguard-go", "boringtun") if i != SUBJECT and i in impls]
refs = list(dict.fromkeys(refs))
order = [
    ("tcp1_gbps", "TCP 1 stream, Gbit/s"),
    ("tcp4_gbps", "TCP 4 streams, Gbit/s"),
    ("udp_kpps", "UDP 1420 B packets, kpps received"),
    ("udp_loss_pct", "UDP loss at full blast, %"),
    ("ping_p50_ms", "ping p50, ms"),
    ("ping_p99_ms", "ping p99, ms"),
    ("ping_lost", "ping lost"),
    ("tcp1_cpu_s_per_GB", "daemon CPU-s/GB, TCP 1 stream"),
    ("tcp4_cpu_s_per_GB", "daemon CPU-s/GB, TCP 4 streams"),
    ("udp_cpu_s_per_GB", "daemon CPU-s/GB, UDP"),
    ("tcp1_wg_cpu_pct", "daemon CPU %, TCP 1 stream (200 = both cores)"),
    ("tcp4_wg_cpu_pct", "daemon CPU %, TCP 4 streams"),
    ("tcp1_retrans", "TCP retransmits, 1 stream"),
    ("tcp4_retrans", "TCP retransmits, 4 streams"),
    ("tcp1_udp_rcvbuf_drops", "UDP rcvbuf drops, TCP 1 stream"),
    ("tcp4_udp_rcvbuf_drops", "UDP rcvbuf drops, TCP 4 streams"),
    ("udp_udp_rcvbuf_drops", "UDP rcvbuf drops, UDP test"),
    ("tcp1_tun_tx_drops", "TUN tx drops, TCP 1 stream"),
    ("tcp4_tun_tx_drops", "TUN tx drops, TCP 4 streams"),
    ("udp_tun_tx_drops", "TUN tx drops, UDP test"),
    ("tcp1_foreign_cpu_pct", "other processes' CPU %, TCP 1 stream"),
    ("tcp4_foreign_cpu_pct", "other processes' CPU %, TCP 4 streams"),
    ("udp_foreign_cpu_pct", "other processes' CPU %, UDP test"),
    ("udp_wg_cpu_pct", "daemon CPU %, UDP test"),
    ("tcp1_sys_busy_pct", "whole machine busy %, TCP 1 stream"),
    ("tcp4_sys_busy_pct", "whole machine busy %, TCP 4 streams"),
    ("udp_sys_busy_pct", "whole machine busy %, UDP test"),
]
known = {m for m, _ in order}
metrics = [(m, d) for m, d in order if any(k[1] == m for k in data if k[0] in impls)]
metrics += [(m, m) for m in sorted({k[1] for k in data if k[0] in impls} - known)]


def fmt(x):
    if x is None or math.isnan(x):
        return "n/a"
    a = abs(x)
    if a >= 100 or float(x).is_integer():
        return f"{x:.0f}"
    return f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 1 else f"{x:.3f}"


def cell(vals):
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} [{fmt(min(vals))}–{fmt(max(vals))}]"


def ratio(num, den):
    paired = [num[r] / den[r] for r in num if r in den and den[r] and not math.isnan(num[r])]
    return cell(paired)


crypto = data.get(("crypto", "cpu_s_per_GB"), {})
head = impls + [f"{SUBJECT} / {r}" for r in refs if SUBJECT in impls]
if crypto and SUBJECT in impls:
    head.append(f"{SUBJECT} / crypto limit")
print("| metric | " + " | ".join(head) + " |")
print("|---|" + "---|" * len(head))
for m, desc in metrics:
    if m.endswith("_waited_quiet_s"):
        continue
    cells = [cell(list(data.get((i, m), {}).values())) for i in impls]
    if SUBJECT in impls:
        subj = data.get((SUBJECT, m), {})
        # ratios only for the figures of the implementations, not for the noise indicators
        noise = any(w in m for w in ("foreign", "sys_busy", "waited"))
        cells += ["" if noise else ratio(subj, data.get((r, m), {})) for r in refs]
        if crypto:
            cells.append(ratio(subj, crypto) if m.endswith("cpu_s_per_GB") else "")
    print(f"| {desc} | " + " | ".join(cells) + " |")

waited = [v for (i, m), d in data.items() if m.endswith("_waited_quiet_s") for v in d.values()]
if waited:
    print()
    print(f"Waited for a quieter machine before {len(waited)} tests, {sum(waited):.0f} s in all.")
if crypto:
    enc = list(data.get(("crypto", "enc_gbps"), {}).values())
    dec = list(data.get(("crypto", "dec_gbps"), {}).values())
    print()
    print(f"Crypto limit, one core (openssl speed, ChaCha20-Poly1305, 1420-byte buffers): encrypt "
          f"{cell(enc)} Gbit/s, decrypt {cell(dec)} Gbit/s, so {cell(list(crypto.values()))} "
          "CPU-s per GB for encrypt + decrypt, the least two daemons can spend on the cipher.")
print()
print("Cells: median [min–max] over the rounds; ratios are medians [min–max] of per-round ratios "
      "(both measured back to back in the same round). CPU-s/GB: user+system CPU of both "
      "daemons per 10^9 payload bytes received. Drops are summed over both namespaces.")
