"""What holding tool_use events costs the agent: time to first text and to the tool_use block.

``python bench/bench_tool_use.py [--runs N]``: the standalone sidecar between the official
``anthropic`` SDK (``messages.create(stream=True)``, raw events) and a real HTTPS Messages server
(``chaperone_testbed.anthropic_api``) that streams a text block (20 deltas) then a ``tool_use``
block (20 ``input_json_delta``), one event every 20 ms. Two sidecars: without tool-use rules (the
answer is only observed) and with one that never matches (every tool_use block is held from its
start to its stop, then released). Per run the client notes, from the request: the first text
delta, the ``content_block_start`` of the tool_use, and the end. Prints the medians.

Expected: the text is not delayed; the tool_use block arrives when its input is complete (its
start is held for the time the model writes the input, ~20 x 20 ms), the end is not delayed.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "sidecar"), str(REPO / "testbed")]

from chaperone_testbed.anthropic_api import AnthropicAPI  # noqa: E402

API = "chaperone.dev/v1alpha1"
KEY = "sk-bench"
CLIENT = textwrap.dedent("""
    import json, sys, time, anthropic
    client = anthropic.Anthropic(base_url=sys.argv[1], api_key="x", max_retries=0)
    out = []
    for _ in range(int(sys.argv[2])):
        t0 = time.monotonic(); first = tool = None
        for e in client.messages.create(model="m", max_tokens=8, stream=True,
                                        messages=[{"role": "user", "content": "go"}]):
            now = time.monotonic() - t0
            if e.type == "content_block_delta" and e.delta.type == "text_delta" and first is None:
                first = now
            if e.type == "content_block_start" and e.content_block.type == "tool_use":
                tool = now
        out.append({"text": first, "tool_use": tool, "end": time.monotonic() - t0})
    print(json.dumps(out))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sidecar(root: Path, api: AnthropicAPI, rules: list[dict]) -> tuple[subprocess.Popen, int, Path]:
    conf = root / "conf"
    for sub in ("connections", "policies", "credentials/claude", "upstream-ca/claude"):
        (conf / sub).mkdir(parents=True)
    (conf / "credentials" / "claude" / "token").write_text(KEY)
    (conf / "upstream-ca" / "claude" / "ca.crt").write_bytes(api.ca_file.read_bytes())
    (conf / "connections" / "claude.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "claude"},
         "spec": {"type": "anthropic", "hosts": ["127.0.0.1"],
                  "credentials": {"source": "secret", "secretRef": {"name": "claude", "tokenKey": "token"}}}}))
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "p"},
         "spec": {"defaultEffect": "allow", "rules": rules}}))
    port, health = free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}/sidecar:{REPO}/operator:{REPO}/testbed",
           "HOME": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "proxy", "--config-dir",
                             str(conf), "--port", str(port), "--health-port", str(health)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    return proc, port, conf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    never = [{"name": "never", "match": {"anthropic": {"toolUses": ["no-such-tool"]}}, "block": {}}]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        api = AnthropicAPI(root / "api", api_key=KEY, split=4, delay=0.02)
        api.answer = lambda body: {"stop_reason": "tool_use", "content": [
            {"type": "text", "text": "x" * 80},
            {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "y" * 66}}]}
        allow = [{"name": "llm", "match": {"methods": ["POST"]}, "allow": {}}]
        for label, rules in (("observed (no tool-use rules)", allow),
                             ("held (a tool-use rule applies)", allow + never)):
            proc, port, conf = sidecar(root / label.split()[0], api, rules)
            ca = str(conf / "ca" / "mitmproxy-ca-cert.pem")
            env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": f"http://127.0.0.1:{port}", "SSL_CERT_FILE": ca,
                   "HOME": str(root)}
            out = subprocess.run([sys.executable, "-c", CLIENT, api.url, str(args.runs)], env=env,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-2000:]
            runs = json.loads(out.stdout.strip().splitlines()[-1])
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            med = {k: statistics.median(r[k] for r in runs) * 1000 for k in ("text", "tool_use", "end")}
            print(f"{label:32} first text {med['text']:7.1f} ms   tool_use start {med['tool_use']:7.1f} ms"
                  f"   end {med['end']:7.1f} ms   (median of {args.runs})")
        api.close()


if __name__ == "__main__":
    main()
