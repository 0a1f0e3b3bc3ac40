"""The README demo (``python -m chaperone_sidecar.demo``, ``make demo``) as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from chaperone_sidecar.demo.scenario import AWS_KEY_ID, AWS_SECRET, DB_PASSWORD, TOKEN

from .pod import PYTHONPATH, base_env


def run_demo(*args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    env = base_env()
    env["PYTHONPATH"] = PYTHONPATH
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "chaperone_sidecar.demo", *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - started


def sections(text: str) -> dict[str, str]:
    """Output split at the ``=== N. title`` headers: {"1": text, ...}."""
    parts = re.split(r"^=== (\d+)\. ", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_the_demo_runs_every_step_and_cleans_up():
    out, elapsed = run_demo()
    assert out.returncode == 0, out.stdout + out.stderr
    assert elapsed < 60, f"the demo took {elapsed:.0f}s"
    text = out.stdout
    steps = sections(text)
    assert sorted(steps) == ["0", "1", "2", "3", "4", "5"], text

    assert "proxy ready" in steps["0"] and "interception CA generated at ca/mitmproxy-ca-cert.pem" in steps["0"]
    # 1. allowed: the ticket, and the token the agent never had reached the upstream
    assert "<- HTTP 200" in steps["1"] and '"id": 42' in steps["1"]
    assert "ok: allowed by rule 'reads'" in steps["1"]
    # 2. blocked: the JSON refusal, printed
    refusal = json.loads(steps["2"][steps["2"].index("{"):steps["2"].rindex("}") + 1])
    assert refusal["error"] == "chaperone_blocked" and refusal["rule"]["name"] == "no-deletes"
    assert "<- HTTP 403" in steps["2"] and "the upstream never saw the request" in steps["2"]
    # 3. masked: placeholders instead of the secrets
    for mask in ("[MASKED:aws-access-key-id]", "[MASKED:aws-secret-key]", "[MASKED:secret-json-key]"):
        assert mask in steps["3"], steps["3"]
    # 4. approval: listed, approved by a subprocess, the held call completed
    assert re.search(r"\$ chaperone approvals --config-dir \S+\n.*NAME .*PHASE", steps["4"])
    assert "Pending" in steps["4"] and "refunds-need-approval" in steps["4"]
    assert re.search(r"approvalrequest \S+ approved by alice \(1/1\)", steps["4"])
    assert "the held call completed" in steps["4"] and '"refunded": true' in steps["4"]
    # 5. the recording: replayed and verified
    assert "$ chaperone sessions replay" in steps["5"] and "session-end" in steps["5"]
    assert re.search(r"OK\s+demo/local/\S+: \d+ events in \d+ chunks?, chain intact, signature valid", steps["5"])
    assert "approved by alice" in steps["5"]
    assert "Demo complete" in text
    # no secret appears anywhere in what the user sees
    for secret in (AWS_SECRET, DB_PASSWORD, TOKEN, AWS_KEY_ID):
        assert secret not in text
    # the temporary config directory is gone
    conf = re.search(r"config dir (/\S+):", text).group(1)
    assert not Path(conf).exists()


def test_the_demo_leaves_a_usable_config_dir(tmp_path):
    conf = tmp_path / "conf"
    out, _ = run_demo("--config-dir", str(conf))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (conf / "ca" / "mitmproxy-ca.pem").is_file()
    requests = list((conf / "approvals").glob("*.json"))
    assert len(requests) == 1
    decided = json.loads(requests[0].read_text())
    assert decided["spec"]["decision"] == "Approved" and decided["spec"]["decidedBy"] == "alice"
    manifests = list((conf / "recordings").rglob("manifest.json"))
    assert len(manifests) == 1
    # the approval commands work on it afterwards, too
    env = base_env()
    env["PYTHONPATH"] = PYTHONPATH
    listing = subprocess.run([sys.executable, "-m", "chaperone_sidecar.standalone_cli", "approvals",
                              "--config-dir", str(conf), "--all"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0 and "Approved by alice" in listing.stdout, listing.stdout


def test_a_failing_step_exits_non_zero():
    out, _ = run_demo("--timeout", "0.01")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DEMO FAILED" in out.stdout
