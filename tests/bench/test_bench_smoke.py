"""Smoke test of the benchmark harness (bench/): behaviour only, with tiny counts.

Every path - direct, bare mitmdump, Chaperone minimal/full (uvloop, the default, and asyncio) and Squid
ssl-bump - starts, serves every scenario of one round correctly (1 KiB bodies byte for byte,
1 MiB sizes, an SSE stream, a download) over HTTP and intercepted HTTPS, and stops cleanly;
Chaperone full really records to S3 and really exports spans; the control-plane measurements
run on the test bed's apiserver; the report renders. No timing is asserted anywhere: the
benchmark reports numbers, tests check behaviour. Squid (``squid-openssl``) and ``wrk`` are
required - missing, this test fails, as the test bed's rule says.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import controlplane, paired, paths, report, run  # noqa: E402
from bench.profile import top_frames  # noqa: E402

TINY = run.Params(rounds=1, lat_n={"1k": 2, "1m": 1}, lat_max_s=20, concurrency=4, tput_s=0.1, tput_max=200,
                  wrk_s=1, sse_streams=1, sse_events=5, download_bytes=3 << 20, download_max_s=30, settle_s=0.2,
                  approvals_n=2, webhook_n=2, kubectl_n=1, profile_s=1)
SCENARIOS = ["lat-http-1k", "lat-https-1k", "lat-http-1m", "lat-https-1m", "tput-http-1k", "tput-https-1k",
             "tput-http-1m", "tput-https-1m", "wrk-http-1k", "sse-https-first", "sse-https-total", "download"]


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    names = list(paths.PATH_NAMES)
    env, closers = run.setup_env(workdir, names, "asyncio", run._cpus(), otlp_out=workdir / "spans.jsonl")
    try:
        yield env
    finally:
        for close in reversed(closers):
            close()


def test_every_path_serves_every_scenario_and_stops(bench_env):
    env = bench_env
    results = {}
    for name in paths.PATH_NAMES:
        path = paths.make_path(name)
        res = run.measure_path(path, env, TINY, run._cpus()[1])
        assert path.proc is None, f"{name} still running"
        assert not res.get("error"), f"{name}: {res.get('error')}\n{res.get('log_tail', '')}"
        assert res["exit_code"] in (0, None), f"{name} exited with {res['exit_code']}:\n{res.get('log_tail')}"
        for scenario in SCENARIOS:
            got = res[scenario]
            assert got["errors"] == 0, f"{name} {scenario}: {got['first_error']}\n{res.get('log_tail', '')}"
            assert got.get("n", got.get("requests")), f"{name} {scenario}: nothing measured"
        if name != "direct":
            assert res["rss_idle"] > 0 and res["download"]["rss_peak"] >= res["download"]["rss_before"] > 0
            assert res["tput-https-1k"]["cpu_us_per_req"] > 0
        res["round"] = 1
        results[name] = [res]

    # Chaperone full records every flow to the S3 server and exports spans through the SDK.
    import boto3

    s3 = boto3.client("s3", **env.s3.client_kwargs())
    for name in ("chaperone-full", "chaperone-full-asyncio"):
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=env.s3_bucket, Prefix=f"{name}/").get("Contents", [])]
        assert any(k.endswith(".json") for k in keys) and len(keys) >= 2, (name, keys)
    # Spans arrive over OTLP/HTTP at the upstream's sink, which decodes them.
    spans = [json.loads(line) for line in (env.workdir / "spans.jsonl").read_text().splitlines()]
    assert any(s["attributes"].get("chaperone.decision") == "allow"
               and s["attributes"].get("chaperone.connection") == "bench-upstream" for s in spans), spans[:3]

    data = {"meta": {**report.machine_info(), "mode": "quick", "params": asdict(TINY), "paths": list(results),
                     "harness_loop": "asyncio", "started": "now", "finished": "later", "load_after": [0, 0, 0]},
            "paths": results, "controlplane": {}}
    summary = report.summarise(data)
    assert len(summary["targets"]) == 8 and {t["status"] for t in summary["targets"]} <= {"met", "missed", "not measured"}
    # Issue 16's targets are figures of this run, each measured (every path ran once).
    assert len(summary["targets16"]) == 5 and {t["status"] for t in summary["targets16"]} <= {"met", "missed"}
    text = report.render(data)
    for label in report.NAMES.values():
        assert f"| {label} |" in text
    for heading in ("## Targets (issue 7)", "## Targets (issue 16: the fast path)", "## Machine and versions", "Throughput: HTTPS intercepted, 1 KiB",
                    "Latency: HTTP, 1 MiB", "### SSE stream", "### Memory and the large download", "## uvloop"):
        assert heading in text
    json.dumps(data, default=str)  # the raw results are serialisable


def test_paired_phase_measures_both_proxies_turn_by_turn(bench_env):
    """Both proxies stay up; every scenario runs once per proxy per pair, order flipping; the
    ratios are per pair; the targets of issue 16 are judged on them; the table renders."""
    # The download is 32 MiB: its CPU is read from /proc in 10 ms ticks, and at ~2.5 ms per MiB
    # (session 14) 2 MiB read 0 or 1 tick - a burst measured "0.0" CPU per MiB and failed CI.
    tiny = paired.PairedParams(pairs=2, burst_s=0.2, concurrency=2, download_bytes=32 << 20, quiesce_max_s=5)
    got = paired.run_paired(run.PAIRED_PATHS, bench_env, tiny, log=lambda m: None)
    for scenario in paired.SCENARIOS:
        for name in run.PAIRED_PATHS:
            bursts = got["bursts"][scenario][name]
            assert len(bursts) == 2 and all(b["errors"] == 0 and b["rate"] > 0 and b["cpu_per_unit"] > 0
                                            for b in bursts), (scenario, name, bursts)
        s = got["summary"][scenario]
        assert s["pairs"] == 2
        low, mid, high = s["rate_ratio"]
        assert 0 < low <= mid <= high
        # the middle ratio is the median of the two per-pair ratios
        base, other = (got["bursts"][scenario][n] for n in run.PAIRED_PATHS)
        ratios = [b["rate"] / a["rate"] for a, b in zip(base, other, strict=True)]
        assert mid == pytest.approx(sum(ratios) / 2)
    data = {"paths": {}, "paired": got}
    targets = {t["target"]: t for t in report._issue16_targets({}, got)}
    judged = [t for t in targets.values() if "paired" in t["figure"]]
    assert len(judged) == 3 and all(t["status"] in ("met", "missed") for t in judged)
    table = "\n".join(report._paired(data))
    assert "| download (MiB/s) |" in table and "| tput-https-1m (req/s) |" in table


def test_quiesce_counts_the_cpu_a_process_spends_until_it_is_idle(tmp_path):
    import subprocess

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass"])
    try:
        spent = paired.quiesce(busy.pid, max_s=10)
    finally:
        busy.wait(10)
    assert spent >= 0.3  # the busy loop's CPU until it ended, not the first quarter-second only


def test_profile_parsing_attributes_samples_to_components():
    raw = ("main (a.py:1);Mask.response (chaperone_sidecar/addons/mask.py:5);scan (chaperone_sidecar/policy/x.py:9) 3\n"
           "main (a.py:1);AddonManager.trigger_event (mitmproxy/addonmanager.py:2) 1\n")
    frames = top_frames(raw)
    assert frames["samples"] == 4
    assert frames["components"][0] == ("Mask.response (chaperone_sidecar/addons/mask.py)", 0.75)
    assert ("mitmproxy addon dispatch (hook fan-out)", 0.25) in frames["components"]
    assert frames["self"][0] == ("scan (chaperone_sidecar/policy/x.py)", 0.75)


def test_path_names():
    assert [paths.make_path(n).name for n in paths.PATH_NAMES] == list(paths.PATH_NAMES)
    variant = paths.make_path("chaperone-full-without-recording")
    assert (variant.profile, variant.without, variant.loop) == ("full", ("recording",), "uvloop")
    assert paths.make_path("chaperone-full-asyncio").loop == "asyncio"  # the standard loop
    for bad in ("chaperone-minimal-without-masking", "chaperone-full-without-brakes", "nginx"):
        with pytest.raises(ValueError):
            paths.make_path(bad)


def test_controlplane_measurements_run(control_plane, crds_installed, tmp_path):
    approval = controlplane.approval_round_trip(control_plane, tmp_path, n=TINY.approvals_n, kubectl_n=1)
    assert not approval["failures"]
    assert approval["api_patch"]["n"] == 2 and approval["kubectl_patch"]["n"] == 1
    for cached in (False, True):
        hook = controlplane.webhook_latency(control_plane, tmp_path, n=TINY.webhook_n, kubectl_n=1, cached_list=cached)
        assert not hook["failures"]
        assert hook["api"]["labelled"]["n"] == hook["api"]["unlabelled"]["n"] == 2
        assert hook["handler"]["n"] >= 3  # every labelled pod (API and kubectl) went through the webhook
        data = {"meta": {}, "controlplane": {"approval": approval, "webhook": hook}}
        assert "Approval round trip" in "\n".join(report._controlplane(data))


def test_masking_engine_before_after_compares_two_checkouts(capsys):
    """bench/ab_masking_engine.py against this very tree as "before": a row per corpus, secrets
    and mode, and the same output from both children (the corpora are handed to both)."""
    from bench import ab_masking_engine

    assert ab_masking_engine.main(["--before", str(REPO), "--rounds", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 6 * 2 * 2
    assert all(row.endswith("same=True") for row in rows), rows
    assert {row.split()[0] for row in rows} == {"text", "prose", "json", "sse", "base64", "binary"}
