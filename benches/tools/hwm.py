#!/usr/bin/env python3
"""Watch the memory high-water mark of every running `quiver agent`.

Polls /proc/PID/status of each process whose argv[1] is `agent` about every millisecond and
prints a line for each rise of VmHWM of more than 1 MiB: the UTC time, VmHWM, and VmRSS, RssAnon
and RssFile at that moment. A rise where VmRSS is well below VmHWM was a spike shorter than the
sampling interval. Stops once the agents it saw are gone, or after MAX_SECONDS (default 300).

    python3 benches/tools/hwm.py [MAX_SECONDS] > hwm.txt &
    target/release/quiver bench job ... --keep-logs DIR   # then line the times up with the logs
"""
import datetime
import os
import sys
import time

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def agents():
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[1] == b"agent":
            found.append(int(pid))
    return found


def status(pid):
    try:
        text = open(f"/proc/{pid}/status").read()
    except OSError:
        return None
    kib = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            kib[key] = int(value.split()[0])
    return kib if len(kib) == len(FIELDS) else None


def main():
    max_seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
    start = time.monotonic()
    highest, pids, scanned, seen_any = {}, [], 0.0, False
    while time.monotonic() - start < max_seconds:
        now = time.monotonic()
        if now - scanned > 0.2:
            pids, scanned = agents(), now
            if pids:
                seen_any = True
            elif seen_any:
                break
        for pid in pids:
            s = status(pid)
            if s is None or s["VmHWM"] <= highest.get(pid, 0) + 1024:
                continue
            highest[pid] = s["VmHWM"]
            t = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
            mib = {k: v / 1024 for k, v in s.items()}
            print(
                f"{t} pid={pid} HWM={mib['VmHWM']:.1f}MiB RSS={mib['VmRSS']:.1f} "
                f"anon={mib['RssAnon']:.1f} file={mib['RssFile']:.1f}",
                flush=True,
            )
        time.sleep(0.001)
    for pid, h in highest.items():
        print(f"final pid={pid} HWM={h / 1024:.1f}MiB = {h * 1024 / 1e6:.1f}MB")


if __name__ == "__main__":
    main()
