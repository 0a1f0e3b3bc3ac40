"""Load generators: a bounded aiohttp client (latency, throughput, SSE, download) and ``wrk``.

Every loop is bounded twice - by a request count and by a wall-clock deadline - so a stuck or
broken proxy ends a scenario instead of the run. Every response is checked (status, size, for
1 KiB the exact body), and a request that fails counts as an error, never as a sample: a proxy
that answers fast with 502s must not look fast.

* :func:`latency` - concurrency 1, one keep-alive connection: per-request times -> p50/p90/p99.
* :func:`throughput` - ``concurrency`` workers on a pool of that many keep-alive connections for
  ``seconds``: completed requests per second.
* :func:`sse` - time to the first event and to the end of an event stream.
* :func:`download` - one large body read and dropped chunk by chunk (RSS is sampled meanwhile).
* :func:`wrk` - plain HTTP through a forward proxy: a Lua script makes wrk send absolute-form
  request targets (``GET http://host:port/1k``), which is what a client does with HTTP_PROXY.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .upstream import BODY_1K, byte_pattern

__all__ = ["client_ssl", "percentile", "Samples", "Rate", "latency", "throughput", "sse", "download",
           "wrk", "WRK"]

WRK = shutil.which("wrk")


def client_ssl(cafiles: Iterable[Path]) -> ssl.SSLContext:
    """A client TLS context trusting exactly ``cafiles`` (upstream CA + interception CAs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies names; no system store
    for path in cafiles:
        ctx.load_verify_locations(cafile=str(path))
    return ctx


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Samples:
    """Latencies in seconds plus the errors of the run."""

    values: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def p(self, q: float) -> float:
        return percentile(self.values, q)


@dataclass
class Rate:
    """Completed requests over elapsed seconds."""

    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    first_error: str = ""
    latency_p50: float = math.nan
    latency_p99: float = math.nan

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class BadResponse(Exception):
    pass


def _session(ctx: ssl.SSLContext, limit: int):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ssl=ctx, use_dns_cache=True)
    return aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=60, sock_connect=10))


def _check(status: int, body: bytes, expect: int) -> None:
    if status != 200:
        raise BadResponse(f"HTTP {status}: {body[:200]!r}")
    if len(body) != expect:
        raise BadResponse(f"{len(body)} bytes instead of {expect}")
    if expect == len(BODY_1K) and body != BODY_1K:
        raise BadResponse("the 1 KiB body differs from what the upstream sent")


async def _get(session, url: str, proxy: str | None, expect: int) -> None:
    async with session.get(url, proxy=proxy) as resp:
        body = await resp.read()
        _check(resp.status, body, expect)


def _note(result, exc: BaseException) -> None:
    result.errors += 1
    if not result.first_error:
        result.first_error = f"{type(exc).__name__}: {exc}"[:300]


async def latency(url: str, proxy: str | None, ctx: ssl.SSLContext, *, expect: int, n: int,
                  max_seconds: float, warmup: int = 5) -> Samples:
    """``n`` sequential requests over one connection (after ``warmup`` unmeasured ones)."""
    out = Samples()
    deadline = time.monotonic() + max_seconds
    async with _session(ctx, 1) as session:
        for i in range(warmup + n):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                await _get(session, url, proxy, expect)
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                _note(out, exc)
                continue
            if i >= warmup:
                out.values.append(time.perf_counter() - start)
    return out


async def throughput(url: str, proxy: str | None, ctx: ssl.SSLContext, *, expect: int,
                     concurrency: int, seconds: float, max_requests: int) -> Rate:
    """Requests per second with ``concurrency`` workers for ``seconds`` (after a warm-up that
    opens every connection)."""
    out = Rate()
    async with _session(ctx, concurrency) as session:
        warm = await asyncio.gather(*(_get(session, url, proxy, expect) for _ in range(concurrency)),
                                    return_exceptions=True)
        for exc in warm:
            if isinstance(exc, BaseException):
                _note(out, exc)
        budget = [max_requests]
        start = time.perf_counter()
        deadline = start + seconds
        lat: list[float] = []

        async def worker() -> None:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    await _get(session, url, proxy, expect)
                except Exception as exc:  # noqa: BLE001
                    _note(out, exc)
                    continue
                lat.append(time.perf_counter() - t0)
                out.requests += 1

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 60)
        out.seconds = time.perf_counter() - start
        out.latency_p50, out.latency_p99 = percentile(lat, 50), percentile(lat, 99)
    return out


async def sse(url: str, proxy: str | None, ctx: ssl.SSLContext, *, events: int, streams: int,
              max_seconds: float) -> tuple[Samples, Samples]:
    """(time to first event, time to end of stream) over ``streams`` sequential streams."""
    first, total = Samples(), Samples()
    deadline = time.monotonic() + max_seconds
    async with _session(ctx, 1) as session:
        for i in range(streams + 1):  # the first stream warms the connection up
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                ttfe, seen = None, 0
                async with session.get(url + f"?n={events}", proxy=proxy) as resp:
                    if resp.status != 200 or not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                        raise BadResponse(f"HTTP {resp.status} {resp.headers.get('Content-Type')}")
                    async for chunk in resp.content.iter_any():
                        if ttfe is None and b"\n\n" in chunk:
                            ttfe = time.perf_counter() - start
                        seen += chunk.count(b"\n\n")
                if seen != events or ttfe is None:
                    raise BadResponse(f"{seen} events instead of {events}")
            except Exception as exc:  # noqa: BLE001
                _note(first, exc)
                _note(total, exc)
                continue
            if i:
                first.values.append(ttfe)
                total.values.append(time.perf_counter() - start)
    return first, total


async def download(url: str, proxy: str | None, ctx: ssl.SSLContext, *, size: int,
                   max_seconds: float, pattern: str = "random") -> Rate:
    """Read ``size`` bytes of /bytes (``pattern``: see upstream.PATTERNS) and drop them;
    ``requests`` is 1 on success."""
    import aiohttp

    out = Rate()
    start = time.perf_counter()
    try:
        async with _session(ctx, 1) as session:
            timeout = aiohttp.ClientTimeout(total=max_seconds)
            async with session.get(url + f"?size={size}&pattern={pattern}", proxy=proxy, timeout=timeout) as resp:
                if resp.status != 200:
                    raise BadResponse(f"HTTP {resp.status}")
                got, head = 0, b""
                async for chunk in resp.content.iter_chunked(1 << 20):
                    if len(head) < 4096:
                        head += chunk[: 4096 - len(head)]
                    got += len(chunk)
                if got != size or head != byte_pattern(0, len(head), pattern):
                    raise BadResponse(f"{got} bytes instead of {size} (or wrong content)")
        out.requests = 1
    except Exception as exc:  # noqa: BLE001
        _note(out, exc)
    out.seconds = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else math.nan


def wrk(url: str, proxy_port: int | None, workdir: Path, *, connections: int, seconds: int,
        cpus: set[int] | None = None) -> Rate:
    """wrk at ``url`` (direct) or through the proxy on ``proxy_port`` with absolute-form URIs."""
    out = Rate()
    if WRK is None:
        out.first_error = "wrk is not installed"
        return out
    target = url
    argv = [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    if proxy_port is not None:
        script = workdir / "absolute-form.lua"
        host = url.split("://", 1)[1].split("/", 1)[0]
        script.write_text(f'wrk.path = "{url}"\nwrk.headers["Host"] = "{host}"\n')
        argv += ["-s", str(script)]
        target = f"http://127.0.0.1:{proxy_port}/"
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] + argv
    try:
        res = subprocess.run(argv + [target], capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired as exc:
        _note(out, exc)
        return out
    text = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    if res.returncode != 0 or not rps or not total:
        out.errors, out.first_error = 1, (res.stderr or text)[-300:]
        return out
    out.requests, out.seconds = int(total.group(1)), _duration(total.group(2))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out.errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    if out.errors:
        out.first_error = "wrk: " + " ".join(m.group(0) for m in (bad, sock) if m)
        out.requests = max(0, out.requests - out.errors)
    dist = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", text, re.M))
    out.latency_p50, out.latency_p99 = _duration(dist.get("50", "")), _duration(dist.get("99", ""))
    return out
