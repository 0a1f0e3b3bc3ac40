"""``GET /metrics`` on the health port of a real proxy process: Prometheus text with the request
counter after proxied requests (``--health-port`` has always promised it; it used to 404).

The process is ``chaperone proxy`` (standalone: local YAML, no apiserver) - the same
``ProxyRuntime``, health server and telemetry set-up as the injected sidecar. No OTLP endpoint
is configured: the Prometheus endpoint must not depend on one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .test_proxy_process import API, REPO, Upstream, free_port, wait_for


def scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_total(text: str, **labels: str) -> float:
    """Sum of ``chaperone_requests_total`` over the series carrying ``labels`` (OTel attribute
    ``chaperone.decision`` is the Prometheus label ``chaperone_decision``)."""
    wanted = {(f"chaperone_{k}", v) for k, v in labels.items()}
    return sum(value for (name, got), value in samples(text).items()
               if name == "chaperone_requests_total" and wanted <= set(got))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    upstream = Upstream(tmp)
    conf = tmp / "conf"
    (conf / "connections").mkdir(parents=True)
    (conf / "policies").mkdir()
    (conf / "upstream-ca" / "local").mkdir(parents=True)
    (conf / "upstream-ca" / "local" / "ca.crt").write_bytes(upstream.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text("namespace: laptop\nuser: dana\n")
    (conf / "connections" / "local.yaml").write_text(json.dumps(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "local"},
         "spec": {"type": "http", "hosts": ["localhost"]}}))
    (conf / "policies" / "reads.yaml").write_text(json.dumps(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "reads"},
         "spec": {"rules": [{"name": "reads", "match": {"methods": ["GET"]}, "allow": {}}]}}))
    port, health = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("no_proxy", "http_proxy", "https_proxy") and not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in ("sidecar", "operator", "testbed"))
    log = tmp / "proxy.log"
    proc = subprocess.Popen([sys.executable, "-m", "chaperone_sidecar.sidecar_cli", "proxy",
                             "--config-dir", str(conf), "--port", str(port), "--health-port", str(health)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, "the standalone proxy")
        yield {"port": port, "health": health, "upstream": upstream, "ca": conf / "ca" / "mitmproxy-ca-cert.pem",
               "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        upstream.close()
    assert code == 0, log.read_text()[-5000:]


def through(proxy, method: str, path: str) -> requests.Response:
    proxies = {"https": f"http://127.0.0.1:{proxy['port']}"}
    return requests.request(method, f"https://localhost:{proxy['upstream'].port}{path}", proxies=proxies,
                            verify=str(proxy["ca"]), timeout=30)


def test_metrics_count_proxied_requests_in_prometheus_text(proxy):
    content_type, before = scrape(proxy["health"])
    assert content_type.startswith("text/plain") and "version=" in content_type
    allowed_before = requests_total(before, decision="allow")
    blocked_before = requests_total(before, decision="block")

    assert through(proxy, "GET", "/one").status_code == 200
    _, after = scrape(proxy["health"])
    # Every line parses as Prometheus text (the parser raises on anything else).
    families = {f.name: f for f in text_string_to_metric_families(after)}
    assert families["chaperone_requests"].type == "counter"
    assert requests_total(after, decision="allow") == allowed_before + 1
    assert requests_total(after, decision="allow", connection="local") >= 1
    assert families["chaperone_request_duration_seconds"].type == "histogram"
    allowed = [s for s in families["chaperone_request_duration_seconds"].samples
               if s.labels.get("chaperone_decision") == "allow"]
    assert sum(s.value for s in allowed if s.name.endswith("_count")) >= 1
    # Buckets in seconds (not the SDK's millisecond defaults, where all requests land in "5").
    bounds = {float(s.labels["le"]) for s in allowed if s.name.endswith("_bucket")}
    assert {0.005, 0.1, 1.0, 10.0} <= bounds and 5000.0 not in bounds
    # The process itself (prometheus_client's collector): what an operator alerts on.
    assert samples(after)[("process_resident_memory_bytes", frozenset())] > 10 * 2**20

    assert through(proxy, "POST", "/two").status_code == 403
    _, third = scrape(proxy["health"])
    assert requests_total(third, decision="block") == blocked_before + 1
    assert requests_total(third, decision="allow") == allowed_before + 1


def test_openmetrics_is_negotiated_and_other_methods_are_refused(proxy):
    content_type, text = scrape(proxy["health"], "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    request = urllib.request.Request(f"http://127.0.0.1:{proxy['health']}/metrics", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 405


def test_metrics_endpoint_is_not_reachable_through_the_proxy(proxy):
    """The agent's way to the health port is the loopback port itself (same pod), never a
    request through the proxy that the sidecar would answer from its own state."""
    proxies = {"http": f"http://127.0.0.1:{proxy['port']}"}
    resp = requests.get(f"http://127.0.0.1:{proxy['health']}/metrics", proxies=proxies, timeout=30)
    assert resp.status_code == 403 and resp.json()["error"] == "chaperone_no_connection"
