"""Run a worker process; track the peak resident memory of its tree and the CPU others used.

Engines spawn helpers (vLLM's engine core and workers, llama.cpp's tools), so the peak is taken
over the sum of VmRSS of the worker and all its descendants, sampled from /proc every 100 ms.

On a shared 2-core machine other processes steal the cores the engine's threads wait on; with
2 threads that can slow an engine several-fold (llama.cpp's spinning thread pool most of all).
`other_cpu_cores` is the machine's busy CPU time minus the worker tree's, over the wall time:
0 means the engine had the machine to itself.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces or parentheses: split after its last ')'.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(root: int) -> int:
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_bytes(pid)
        stack.extend(tree.get(pid, []))
    return total


def busy_cpu_seconds() -> float:
    """CPU time all cores have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(limit_s: float, max_other_cores: float = 0.2, window_s: float = 5.0) -> float:
    """Wait (at most `limit_s`) until other processes use under `max_other_cores` over a window.

    Returns the other load seen in the last window, in cores.
    """
    deadline = time.monotonic() + limit_s
    while True:
        busy0 = busy_cpu_seconds()
        time.sleep(window_s)
        other = (busy_cpu_seconds() - busy0) / window_s
        if other < max_other_cores or time.monotonic() >= deadline:
            return other


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Finished:
    returncode: int
    output: str
    peak_rss_bytes: int
    wall_s: float
    timed_out: bool
    other_cpu_cores: float  # mean number of cores kept busy by other processes meanwhile


def run_tracked(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path, timeout_s: float) -> Finished:
    """Run `cmd` with stdout+stderr to `log_path`; on timeout end its process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak = 0
    busy0, own0 = busy_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss_bytes(proc.pid))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - own0)
    return Finished(proc.returncode, log_path.read_text(errors="replace"), peak, wall, timed_out,
                    max(others, 0.0) / wall)
