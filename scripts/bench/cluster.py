#!/usr/bin/env python3
"""The same job on 4 worker processes over loopback vs the embedded default (ranks as threads of
one process): total CPU seconds of every process involved, and the bytes the ranks sent each
other against the plan's own count.

CPU time is read from /proc/PID/stat (utime + stime) of each server process just before and
just after the job, plus the client's own, so model loading and warm-up are left out on both
sides. Needs only the Python standard library and a release build of tome:

    cargo build --release -p tome-cli
    python3 scripts/bench/cluster.py [--book data/books/plrabn12.txt] [--out docs/bench/cluster.json]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOME = os.path.join(ROOT, "target/release/tome")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_port(port, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def start(args, log):
    port = free_port()
    proc = subprocess.Popen([TOME, *args, "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    wait_port(port)
    return proc, port


def run_job(port, book, ranks, out, job_args):
    """Runs the job through `tome process` against the server; returns (client CPU s, done record)."""
    t0 = os.times()
    subprocess.run([TOME, "process", book, "--coordinator", f"http://127.0.0.1:{port}", "--ranks", str(ranks), "--quiet", "--out", out, *job_args], check=True, stdout=subprocess.DEVNULL)
    t1 = os.times()
    with open(os.path.join(out, "summary.jsonl")) as f:
        done = json.loads(f.readline())["done"]
    return (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system), done


def measure(servers, port, book, ranks, out, job_args, repeats):
    """Best of `repeats` runs: (total CPU s, wall s, done record)."""
    best = None
    for _ in range(repeats):
        before = [cpu_seconds(p.pid) for p in servers]
        start_time = time.time()
        client, done = run_job(port, book, ranks, out, job_args)
        wall = time.time() - start_time
        after = [cpu_seconds(p.pid) for p in servers]
        total = client + sum(a - b for a, b in zip(after, before))
        if best is None or total < best[0]:
            best = (total, wall, done)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--book", default=os.path.join(ROOT, "data/books/plrabn12.txt"))
    ap.add_argument("--model", default=os.path.join(ROOT, "data/models/all-MiniLM-L6-v2"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    job_args = ["--attention", "window:512", "--positions", "tile"]
    logs = tempfile.mkdtemp(prefix="tome-bench-cluster-")
    procs = []
    try:
        embedded, eport = start(["run", "--model", a.model, "--max-concurrent-jobs", "1"], os.path.join(logs, "embedded.log"))
        procs.append(embedded)
        emb = measure([embedded], eport, a.book, a.workers, os.path.join(logs, "out-embedded"), job_args, a.repeats)
        embedded.terminate()

        workers = []
        for i in range(a.workers):
            w, wport = start(["serve", "worker", "--model", a.model], os.path.join(logs, f"worker{i}.log"))
            workers.append((w, wport))
            procs.append(w)
        listing = ",".join(f"127.0.0.1:{p}" for _, p in workers)
        coordinator, cport = start(["serve", "coordinator", "--model", a.model, "--workers", listing, "--probe-ms", "200"], os.path.join(logs, "coordinator.log"))
        procs.append(coordinator)
        time.sleep(1.0)  # the first membership probes
        clu = measure([coordinator] + [w for w, _ in workers], cport, a.book, a.workers, os.path.join(logs, "out-cluster"), job_args, a.repeats)
    finally:
        for p in procs:
            p.terminate()
    record = {
        "job": f"{os.path.basename(a.book)}, {emb[2]['tokens']} tokens, MiniLM, window 512, {a.workers} ranks",
        "embedded": {"cpu_seconds": round(emb[0], 2), "wall_seconds": round(emb[1], 2), "bytes_exchanged": emb[2]["bytes_exchanged"]},
        "cluster": {
            "workers": a.workers,
            "cpu_seconds": round(clu[0], 2),
            "wall_seconds": round(clu[1], 2),
            "bytes_exchanged": clu[2]["bytes_exchanged"],
            "wire_bytes_exchanged": clu[2]["wire_bytes_exchanged"],
        },
        "cpu_ratio": round(clu[0] / emb[0], 3),
        "bytes_equal_to_plan": clu[2]["bytes_exchanged"] == emb[2]["bytes_exchanged"],
        "framing_overhead": round(clu[2]["wire_bytes_exchanged"] / clu[2]["bytes_exchanged"] - 1, 6),
        "cpus": os.cpu_count(),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
