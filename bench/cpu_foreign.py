#!/usr/bin/env python3
"""Noise indicator for lab.sh: CPU used by processes that are NOT part of the benchmark.

  cpu_foreign.py snap PGRP FILE        write a snapshot of all processes outside process group PGRP
  cpu_foreign.py diff FILE1 FILE2 WALL print foreign CPU as % of one core over WALL seconds

Per process it takes utime+stime+cutime+cstime (so short-lived children that were
reaped in the window show up in their parent's cutime/cstime). Processes that start
in the window count from 0; processes that exit in the window unreaped are missed,
so this is a lower bound. Kernel threads are included (kdamond, kworkers), except
ksoftirqd/* which mostly process the benchmark's own packets.
"""
import os, sys

HZ = os.sysconf("SC_CLK_TCK")


def snap(pgrp):
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            s = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        # f[0]=state(3) f[2]=pgrp(5) f[11..14]=utime,stime,cutime,cstime(14..17) f[19]=starttime(22)
        if int(f[2]) == pgrp or comm.startswith("ksoftirqd"):
            continue   # ours, or kernel softirq threads (they mostly process our own packets)
        out[(int(d), int(f[19]))] = (sum(int(x) for x in f[11:15]), comm)
    return out


def main():
    if sys.argv[1] == "snap":
        snapd = snap(int(sys.argv[2]))
        with open(sys.argv[3], "w") as fh:
            for (pid, st), (t, comm) in snapd.items():
                fh.write(f"{pid} {st} {t} {comm.replace(' ', '_')}\n")
    else:
        def load(p):
            r = {}
            for line in open(p):
                pid, st, t, comm = line.split()
                r[(pid, st)] = (int(t), comm)
            return r
        a, b, wall = load(sys.argv[2]), load(sys.argv[3]), float(sys.argv[4])
        total, per = 0, {}
        for k, (t, comm) in b.items():
            d = t - a.get(k, (0, ""))[0]
            if d > 0:
                total += d
                per[comm] = per.get(comm, 0) + d
        top = sorted(per.items(), key=lambda kv: -kv[1])[:3]
        pct = 100.0 * total / HZ / wall if wall > 0 else 0.0
        print(f"{pct:.1f} " + ",".join(f"{c}:{100.0*v/HZ/wall:.0f}%" for c, v in top) if top else f"{pct:.1f} -")


main()
