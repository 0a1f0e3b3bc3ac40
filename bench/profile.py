"""py-spy profiles of a proxy under load: the top frames behind a missed target.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); from them
:func:`top_frames` computes, per function, the share of samples where it is the innermost
frame (*self*) and where it is anywhere on the stack (*total*), and per *component* (which
addon hook or helper a sample belongs to, :func:`component`) - the view that says what a
feature costs. Sampling is ``--nonblocking``
(the proxy is never paused) and needs ptrace rights (root, or ``kernel.yama.ptrace_scope=0``).

    python bench/profile.py [--path chaperone-full] [--seconds 10] [--raw OUT.txt]

profiles one path alone (HTTPS 1 KiB, concurrency 32; ``--size 1m``: 1 MiB text bodies;
``--size download``: one large binary download, the 1 GiB scenario's stream) and prints its
top frames; ``--raw`` keeps the collapsed stacks for a closer look (e.g. ``grep`` a function's
callers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PY_SPY", "record", "top_frames", "component", "profile_under_load"]

PY_SPY = shutil.which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                                    if Path(sys.executable).with_name("py-spy").exists() else None)
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """``func (pkg/module.py:12)`` -> ``func (pkg/module.py)``: lines of a function merged."""
    match = _FRAME.match(frame.strip())
    return f"{match.group('func')} ({match.group('file')})" if match else frame.strip()


_OWN = ("chaperone_sidecar/proxy.py", "chaperone_sidecar/sidecar_cli.py",
        "chaperone_sidecar/addons/pipeline.py")  # plumbing, not a feature: look past it


def component(frames: list[str]) -> str:
    """Who a stack belongs to: the first Chaperone frame (an addon hook, or the function a
    helper thread runs), else the first mitmproxy addon, mitmproxy's hook dispatch itself,
    OpenTelemetry, boto3, TLS, or the proxy core."""
    for frame in frames:
        if "(chaperone_sidecar/" in frame and not any(own in frame for own in _OWN):
            return frame
    for frame in frames:
        if "(mitmproxy/addons/" in frame:
            return frame
    if any("(mitmproxy/addonmanager.py)" in f for f in frames) and not any("(OpenSSL/" in f for f in frames):
        return "mitmproxy addon dispatch (hook fan-out)"
    for marker, name in (("(opentelemetry/", "OpenTelemetry SDK"), ("(botocore/", "boto3 / botocore"),
                         ("(boto3/", "boto3 / botocore"), ("(OpenSSL/", "TLS (pyOpenSSL)")):
        if any(marker in f for f in frames):
            return name
    return "mitmproxy core, asyncio, sockets"


def top_frames(raw: str, limit: int = 40) -> dict[str, Any]:
    """{"samples": N, "self": [(frame, share)], "total": [(frame, share)], "components":
    [(component, share)]} from collapsed stacks."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    comp_c: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += n
        self_c[frames[-1]] += n
        comp_c[component(frames)] += n
        for frame in set(frames):
            total_c[frame] += n
    share = (lambda c: [(f, v / samples) for f, v in c.most_common(limit)]) if samples else (lambda c: [])
    return {"samples": samples, "self": share(self_c), "total": share(total_c), "components": share(comp_c)}


def record(pid: int, seconds: float, out: Path, rate: int = 250, threads: bool = False) -> subprocess.Popen:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (returns the running process);
    ``threads``: each stack starts with its thread's frame (``--threads``), so one thread's
    samples - the event loop's, which bounds throughput - can be told from the pools'."""
    if PY_SPY is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out),
                             *(["--threads"] if threads else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def profile_under_load(pid: int, workdir: Path, seconds: float, load: Callable[[], Any],
                       name: str, threads: bool = False) -> dict[str, Any]:
    """Profile ``pid`` while ``load()`` (a coroutine factory) runs; returns :func:`top_frames`."""
    out = workdir / f"py-spy-{name}.txt"
    proc = record(pid, seconds, out, threads=threads)
    result: dict[str, Any] = {}

    def drive() -> None:
        result["load"] = asyncio.run(load())

    thread = threading.Thread(target=drive)
    thread.start()
    try:
        _, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    thread.join(seconds + 120)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"py-spy exit {proc.returncode}: {(err or '')[-500:]}", "samples": 0, "self": [], "total": []}
    frames = top_frames(out.read_text())
    frames["load"] = result.get("load")
    return frames


def main(argv: list[str] | None = None) -> int:
    import tempfile

    sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("", "sidecar", "operator", "testbed")]
    from bench import load, paths
    from bench.run import _cpus, _harness_loop, setup_env
    from bench.upstream import SIZES

    parser = argparse.ArgumentParser(description="py-spy profile of one proxy path under load")
    parser.add_argument("--path", default="chaperone-full", help=f"one of {', '.join(paths.PATH_NAMES)}")
    parser.add_argument("--size", default="1k", choices=[*sorted(SIZES), "download"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--raw", default=None, help="keep the collapsed stacks here")
    parser.add_argument("--threads", action="store_true",
                        help="stacks start with their thread (py-spy --threads): grep the event loop's")
    args = parser.parse_args(argv)
    cpus = _cpus()
    if cpus[1]:
        os.sched_setaffinity(0, cpus[1])
    workdir = Path(tempfile.mkdtemp(prefix="chaperone-profile-"))
    env, closers = setup_env(workdir, [args.path], _harness_loop(), cpus)
    try:
        path = paths.make_path(args.path).start(env)
        try:
            ctx = load.client_ssl(env.client_cafiles)
            name = f"{args.path}-{args.size}"
            if args.size == "download":  # more bytes than the proxy can pass in the profile's time
                url = env.upstream.url("https", "/bytes")
                res = profile_under_load(path.pid, workdir, args.seconds,
                                         lambda: load.download(url, path.proxy, ctx, size=64 << 30,
                                                               max_seconds=args.seconds + 1), name, args.threads)
            else:
                url = env.upstream.url("https", f"/{args.size}")
                res = profile_under_load(path.pid, workdir, args.seconds,
                                         lambda: load.throughput(url, path.proxy, ctx, expect=SIZES[args.size],
                                                                 concurrency=32, seconds=args.seconds + 1,
                                                                 max_requests=200_000), name, args.threads)
        finally:
            path.stop()
    finally:
        for close in reversed(closers):
            close()
    if args.raw and (workdir / f"py-spy-{name}.txt").exists():
        shutil.copy(workdir / f"py-spy-{name}.txt", args.raw)
    print(f"{res.get('samples')} samples {res.get('error', '')}; load {res.get('load')}")
    for key in ("components", "self", "total"):
        print(f"\n{key}:")
        for frame, share in res.get(key, [])[:args.limit]:
            print(f"  {share * 100:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
