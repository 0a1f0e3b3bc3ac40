"""The demo's steps, 1 to 5, and :func:`run_demo` that sets up and runs them in order.

Each step makes the agent's call (or runs a ``chaperone`` command), prints what happened and
checks it, raising :class:`~.plumbing.DemoFailure` with what happened instead; the whole run
shares one deadline.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from .plumbing import Agent, DemoFailure, Proxy, expect, header, indent, run_cli, say, show_response
from .scenario import APPROVER, AWS_KEY_ID, AWS_SECRET, DB_PASSWORD, TOKEN, TicketsAPI, write_config

# ============================================================================ the steps

def step_allowed(agent: Agent, api: TicketsAPI, base: str) -> None:
    header("1. Allowed call: GET /tickets/42")
    say(f"  -> GET {base}/tickets/42   (the agent sends no credentials)")
    status, body, _ = agent.call("GET", f"{base}/tickets/42")
    show_response(status, body)
    expect(status == 200 and isinstance(body, dict) and body.get("id") == 42,
           f"expected 200 with ticket 42, got {status}: {body}")
    seen = api.requests_to("GET", "/tickets/42")
    expect(bool(seen) and seen[-1]["authorization"] == f"Bearer {TOKEN}",
           "the upstream did not receive the injected bearer token")
    say(f"  ok: allowed by rule 'reads'; the upstream saw 'Authorization: Bearer {TOKEN[:8]}...'"
        " injected by the proxy")


def step_blocked(agent: Agent, api: TicketsAPI, base: str) -> None:
    header("2. Blocked call: DELETE /tickets/42")
    say(f"  -> DELETE {base}/tickets/42")
    status, body, headers = agent.call("DELETE", f"{base}/tickets/42")
    show_response(status, body)
    expect(status == 403 and isinstance(body, dict) and body.get("error") == "chaperone_blocked",
           f"expected a 403 chaperone_blocked refusal, got {status}: {body}")
    expect(not api.requests_to("DELETE", "/tickets/42"), "the blocked DELETE reached the upstream")
    say("  ok: refused with rule 'no-deletes'; the upstream never saw the request")


def step_masked(agent: Agent, api: TicketsAPI, base: str) -> None:
    header("3. Masked call: GET /deployments/billing/config")
    say(f"  -> GET {base}/deployments/billing/config   (the upstream answers with live secrets)")
    status, body, _ = agent.call("GET", f"{base}/deployments/billing/config")
    show_response(status, body)
    text = json.dumps(body)
    expect(status == 200 and isinstance(body, dict) and body.get("service") == "billing",
           f"expected 200 with the billing config, got {status}: {body}")
    leaked = [name for name, secret in (("AWS access key id", AWS_KEY_ID),
                                        ("AWS secret key", AWS_SECRET),
                                        ("database password", DB_PASSWORD)) if secret in text]
    expect(not leaked, f"the agent received unmasked secrets: {', '.join(leaked)}")
    expect(api.requests_to("GET", "/deployments/billing/config") != [], "the call never reached the upstream")
    say("  ok: the AWS key pair and the database password were masked before reaching the agent")


def _wait_for_request(approvals_dir: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        names = sorted(p.stem for p in approvals_dir.glob("*.json") if not p.name.startswith("."))
        if names:
            return names[0]
        time.sleep(0.1)
    raise DemoFailure(f"no ApprovalRequest appeared in {approvals_dir}")


def step_approval(agent: Agent, api: TicketsAPI, base: str, conf: Path, deadline: float) -> None:
    header("4. Approval: POST /tickets/42/refund (held until a human decides)")
    say(f"  -> POST {base}/tickets/42/refund   (the agent's call is held open)")
    result: dict[str, Any] = {}

    def call() -> None:
        started = time.monotonic()
        try:
            result["response"] = agent.call("POST", f"{base}/tickets/42/refund",
                                            {"reason": "double charge", "amount_eur": 129})
        except Exception as exc:  # reported below
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    name = _wait_for_request(conf / "approvals", deadline)
    expect(not api.requests_to("POST", "/tickets/42/refund"), "the refund reached the upstream before approval")
    expect(thread.is_alive(), f"the held call returned before the approval: {result}")
    say("  (meanwhile, a human looks at what is waiting)")
    run_cli("approvals", "--config-dir", str(conf))
    run_cli("approve", name, "--config-dir", str(conf), "--as", APPROVER,
            "--reason", "refund confirmed with the customer")
    thread.join(max(0.0, deadline - time.monotonic()))
    expect(not thread.is_alive(), "the held call did not complete after the approval")
    expect("error" not in result, f"the held call failed: {result.get('error')}")
    status, body, _ = result["response"]
    say(f"  agent: the held call completed after {result['seconds']:.1f}s")
    show_response(status, body)
    expect(status == 200 and isinstance(body, dict) and body.get("refunded") is True,
           f"expected 200 refunded after approval, got {status}: {body}")
    expect(len(api.requests_to("POST", "/tickets/42/refund")) == 1, "the refund was not forwarded exactly once")
    say(f"  ok: held, approved by {APPROVER} as ApprovalRequest {name}, then forwarded once")


def step_recording(conf: Path) -> None:
    header("5. The recorded session")
    recordings = str(conf / "recordings")
    listing = json.loads(run_cli("sessions", "list", "--dir", recordings, "--json", show=False))
    expect(len(listing) == 1, f"expected one recorded session, found {len(listing)}")
    entry = listing[0]
    session = entry.get("session") or (entry.get("ref") or {}).get("session") or ""
    expect(bool(session), f"cannot tell the session id from {entry}")
    replay = run_cli("sessions", "replay", session, "--dir", recordings, "--body-limit", "160")
    for needle, what in (("reads", "the allowed call"), ("no-deletes", "the blocked call"),
                         ("refunds-need-approval", "the approval rule"),
                         ("[MASKED:aws-secret-key]", "the masked response")):
        expect(needle in replay, f"the replay does not show {what} ({needle!r})")
    # Who approved is in the approval event itself (the replay's one-line-per-flow view may
    # not show it): read the events back through the same reader the CLI uses.
    from ..recording.reader import find_session, load_session, open_store

    store = open_store(directory=recordings)
    events = load_session(store, find_session(store, session)).events
    approvals = [e for e in events if e.get("type") == "approval"]
    expect(bool(approvals), "the recording has no approval event")
    for event in approvals:
        data = event.get("data") or {}
        who = data.get("approver") or data.get("approvedBy") or data.get("decidedBy") or ""
        who = ", ".join(who) if isinstance(who, list) else str(who)
        state = data.get("state") or data.get("outcome") or data.get("phase") or "?"
        say(f"  approval event #{event.get('seq')}: {data.get('name')} {state} by {who or '?'}")
    expect(any(APPROVER in json.dumps(e.get("data")) for e in approvals),
           f"no approval event names the approver {APPROVER}")
    for secret in (AWS_SECRET, DB_PASSWORD, TOKEN):
        expect(secret not in replay, "the recording holds an unmasked secret")
    verify = run_cli("sessions", "verify", session, "--dir", recordings, "--key", str(conf / "manifest.pub"))
    expect(verify.startswith("OK"), f"verification failed: {verify}")
    # The stored files, not just the replay, must be free of the secrets.
    stored = b"".join(p.read_bytes() for p in Path(recordings).rglob("*") if p.is_file())
    expect(not any(s.encode() in stored for s in (AWS_SECRET, DB_PASSWORD, TOKEN, AWS_KEY_ID)),
           "a stored recording file holds an unmasked secret")
    say("  ok: every call is in the recording (masked), the chain is intact and the manifest's "
        "Ed25519 signature checks out")


# ============================================================================ the run

def run_demo(conf: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    header("0. Setup: a local HTTPS tickets API and `chaperone proxy` (standalone)")
    api = TicketsAPI(conf / "upstream")
    say(f"  tickets API on https://localhost:{api.port} (certificate from its own CA; it needs a"
        " bearer token only the proxy holds)")
    write_config(conf, api)
    say(f"  config dir {conf}:")
    for path in sorted(p for p in conf.rglob("*") if p.is_file() and "upstream" != p.parent.name):
        say(f"    {path.relative_to(conf)}")
    proxy = Proxy(conf)
    try:
        started = time.monotonic()
        proxy.wait_ready(deadline)
        say(f"  proxy ready in {time.monotonic() - started:.1f}s on {proxy.url}; interception CA "
            f"generated at {proxy.ca_cert.relative_to(conf)}")
        expect(proxy.ca_cert.is_file(), "the proxy did not generate its CA")
        agent = Agent(proxy)
        base = f"https://localhost:{api.port}"
        steps = [lambda: step_allowed(agent, api, base), lambda: step_blocked(agent, api, base),
                 lambda: step_masked(agent, api, base),
                 lambda: step_approval(agent, api, base, conf, deadline)]
        for step in steps:
            step()
            if time.monotonic() > deadline:
                raise DemoFailure(f"the demo ran over its {timeout:.0f}s budget")
        say("\n  stopping the proxy (SIGTERM): it closes the session and signs the manifest")
        code = proxy.stop()
        expect(code == 0, f"chaperone proxy exited with {code}")
    except BaseException:
        tail = proxy.log_tail()
        proxy.stop(10)
        if tail:
            say("\n  last lines of the proxy's log:\n" + indent(tail))
        raise
    finally:
        api.close()
    step_recording(conf)
