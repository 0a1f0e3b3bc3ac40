"""The story of a tool_use: what the model asked for, what the agent did, and what was refused.

An agent process (the official ``anthropic`` Python SDK in a tool loop, its HTTP tool run with
``requests``; nothing but the proxy, the trust bundle and a placeholder key in its environment)
works through the real sidecar (``chaperone proxy``, standalone) against a real HTTPS server
playing the Anthropic Messages API (``chaperone_testbed.anthropic_api``) and a ticket API:

1. the model asks to close ticket 42 with ``curl -X DELETE .../tickets/42`` (a ``tool_use``);
2. the agent runs it - its DELETE goes through the sidecar - and returns the ``tool_result``;
3. the model then asks for ``rm -rf /var/lib/app``: a tool-use rule blocks it, the SDK receives
   a text block naming the rule (and ``stop_reason: end_turn``), the agent stops its turn and
   never runs anything;
4. ``chaperone sessions replay`` shows "the model asked X (tool_use id) -> the agent did Y" for
   the ticket and the blocked request with its rule; ``sessions verify`` accepts the chain.

Runs without the cluster (docs/e2e.md): the sidecar's policy engine, recording and replay are
the same code in standalone mode.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from chaperone_testbed.anthropic_api import AnthropicAPI
from chaperone_testbed.pki import CertAuthority

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHONPATH = ":".join(str(REPO / p) for p in ("sidecar", "operator", "testbed"))
API = "chaperone.dev/v1alpha1"
KEY = "sk-ant-only-the-sidecar-has-it"

AGENT = textwrap.dedent("""
    import json, subprocess, sys
    import anthropic, requests
    client = anthropic.Anthropic(base_url=sys.argv[1], api_key="placeholder", max_retries=0)
    tools = [{"name": "bash", "description": "run a command", "input_schema": {"type": "object"}}]
    messages = [{"role": "user", "content": "close ticket 42, then free disk space"}]
    log = []
    for turn in range(4):
        with client.messages.stream(model="claude-test", max_tokens=256, tools=tools, messages=messages) as s:
            reply = s.get_final_message()
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        log.append({"stop": reply.stop_reason, "blocks": [b.model_dump(exclude_none=True) for b in reply.content]})
        if reply.stop_reason != "tool_use":
            break
        results = []
        for block in reply.content:
            if block.type != "tool_use":
                continue
            # the "bash" tool: this agent only knows curl -X METHOD URL
            words = block.input["command"].split()
            resp = requests.request(words[2], words[3], timeout=30)
            results.append({"type": "tool_result", "tool_use_id": block.id, "content": str(resp.status_code)})
        messages.append({"role": "user", "content": results})
    print(json.dumps(log))
""")


class Tickets:
    """The ticket API the agent's tool calls (HTTPS, its own CA); keeps what it was asked."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertAuthority("tickets-ca")
        self.ca_file = ca.write_cert(directory / "ca.crt")
        pair = ca.write_server_cert(directory, "tickets", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        self.seen: list[tuple[str, str]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                seen.append((self.command, self.path))
                body = json.dumps({"ok": True, "method": self.command, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_DELETE = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def model(tickets_url: str):
    def answer(body: dict[str, Any]) -> dict[str, Any]:
        results = [b for m in body["messages"] if isinstance(m["content"], list)
                   for b in m["content"] if b.get("type") == "tool_result"]
        if not results:
            return {"stop_reason": "tool_use", "content": [
                {"type": "text", "text": "Closing the ticket."},
                {"type": "tool_use", "id": "toolu_close42", "name": "bash",
                 "input": {"command": f"curl -X DELETE {tickets_url}/tickets/42"}}]}
        if results[-1]["tool_use_id"] == "toolu_close42":
            return {"stop_reason": "tool_use", "content": [
                {"type": "tool_use", "id": "toolu_wipe", "name": "bash",
                 "input": {"command": "rm -rf /var/lib/app", "description": "free disk space"}}]}
        return {"stop_reason": "end_turn", "content": [{"type": "text", "text": "done"}]}
    return answer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-use-story")
    tickets = Tickets(root / "tickets")
    api = AnthropicAPI(root / "anthropic", api_key=KEY, split=4)
    api.answer = model(f"https://localhost:{tickets.port}")
    conf = root / "conf"
    for sub in ("connections", "policies", "credentials/claude", "upstream-ca/claude", "upstream-ca/tickets"):
        (conf / sub).mkdir(parents=True)
    (conf / "credentials" / "claude" / "token").write_text(KEY)
    (conf / "upstream-ca" / "claude" / "ca.crt").write_bytes(api.ca_file.read_bytes())
    (conf / "upstream-ca" / "tickets" / "ca.crt").write_bytes(tickets.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "team-a", "user": "dave"}))
    for name, spec in {"claude": {"type": "anthropic", "hosts": ["127.0.0.1"], "credentials": {
                           "source": "secret", "secretRef": {"name": "claude", "tokenKey": "token"}}},
                       "tickets": {"type": "http", "hosts": ["localhost"], "credentials": {"source": "none"}}}.items():
        (conf / "connections" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": spec}))
    (conf / "policies" / "agents.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
         "spec": {"defaultEffect": "allow", "rules": [
             {"name": "no-recursive-rm", "description": "the model may not ask for recursive deletes",
              "match": {"anthropic": {"toolUses": ["bash"], "toolInputRegex": r"\brm\s+-\w*r"}},
              "block": {"message": "recursive deletes are done by people"}}]}}))
    port, health = _free_port(), _free_port()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHONPATH, "HOME": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "proxy", "--config-dir",
                             str(conf), "--port", str(port), "--health-port", str(health)],
                            env=env, stdout=subprocess.DEVNULL, stderr=(root / "proxy.log").open("wb"))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "proxy.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the sidecar did not become ready"
            time.sleep(0.2)
        ca = str(conf / "ca" / "mitmproxy-ca-cert.pem")
        agent_env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": f"http://127.0.0.1:{port}", "SSL_CERT_FILE": ca,
                     "REQUESTS_CA_BUNDLE": ca, "HOME": str(root)}
        out = subprocess.run([sys.executable, "-c", AGENT, api.url], env=agent_env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        turns = json.loads(out.stdout.strip().splitlines()[-1])
        proc.send_signal(signal.SIGTERM)  # the session is closed, signed and shipped
        assert proc.wait(60) == 0, (root / "proxy.log").read_text()[-3000:]
        yield {"turns": turns, "conf": conf, "api": api, "tickets": tickets, "root": root}
    finally:
        if proc.poll() is None:
            proc.kill()
        api.close()
        tickets.close()


def chaperone(story: dict, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHONPATH, "HOME": str(story["root"])}
    return subprocess.run([sys.executable, "-m", "chaperone_sidecar.recording.sessions_cli", "sessions", *args,
                           "--dir", str(story["conf"] / "recordings")], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_agent_did_what_was_allowed_and_never_saw_the_blocked_tool_use(story):
    first, second = story["turns"]
    assert first["stop"] == "tool_use" and first["blocks"][1]["id"] == "toolu_close42"
    assert story["tickets"].seen == [("DELETE", "/tickets/42")]  # it ran the tool, once
    assert second["stop"] == "end_turn" and [b["type"] for b in second["blocks"]] == ["text"]
    refusal = second["blocks"][0]["text"]
    assert refusal.startswith("[Chaperone blocked tool_use toolu_wipe (bash): rule team-a/agents#no-recursive-rm"
                              " - recursive deletes are done by people")
    assert "rm -rf" not in json.dumps(story["turns"])
    # end_turn: the agent stopped, no third LLM call; the second one carried the tool_result
    assert len(story["api"].seen) == 2
    assert story["api"].seen[1]["body"]["messages"][-1]["content"][0]["tool_use_id"] == "toolu_close42"
    assert all(s["headers"]["x-api-key"] == KEY for s in story["api"].seen)  # injected by the sidecar


def test_the_replay_shows_what_the_model_asked_and_what_the_agent_did(story):
    listed = chaperone(story, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    session = json.loads(listed.stdout)[0]["session"]
    out = chaperone(story, "replay", session)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("the model asked -> the agent did:")
    pairs = "\n".join(lines[start:])
    asked = next(i for i, line in enumerate(lines) if "tool_use toolu_close42 bash" in line)
    assert "curl -X DELETE" in lines[asked]
    assert "-> #" in lines[asked + 1] and "DELETE" in lines[asked + 1] and "/tickets/42" in lines[asked + 1]
    assert "score" in lines[asked + 1] and "path /tickets/42" in lines[asked + 1]
    assert "tool_use toolu_wipe bash" in pairs and "BLOCKED by team-a/agents#no-recursive-rm" in pairs
    data = json.loads(chaperone(story, "replay", session, "--json").stdout)
    linked = {u["toolUseId"]: u for u in data["toolUses"]}
    [action] = linked["toolu_close42"]["actions"]
    assert action["what"].startswith("DELETE localhost") and "/tickets/42" in action["what"]
    assert action["score"] >= 0.4 and action["decision"] == "allow"
    assert linked["toolu_wipe"]["actions"] == [] and linked["toolu_wipe"]["blocked"]
    verify = chaperone(story, "verify", session, "--skip-signature")
    assert verify.returncode == 0, verify.stdout + verify.stderr
