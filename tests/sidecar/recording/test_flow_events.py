"""flow_events' per-flow helpers after the issue 16 hot-path work: the same values as the
straightforward forms they replace (mitmproxy's properties, the regex per header, strftime)."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from chaperone_sidecar.policy.model import Identity
from chaperone_sidecar.recording.events import format_time
from chaperone_sidecar.recording.flow_events import REDACTED, identity_of, pretty_url, redact_headers

SENSITIVE = re.compile(
    r"authorization|token|secret|passw|pwd|api[-_]?key|cookie|session|credential|signature|"
    r"^key$|^sig$|auth", re.IGNORECASE)


def reference_headers(headers: http.Headers, extra: str = "") -> list[list[str]]:
    """redact_headers without a masker as it was written before (items(multi=True), a search
    per header)."""
    return [[n, REDACTED if SENSITIVE.search(n) or (extra and n.lower() == extra) else v]
            for n, v in headers.items(multi=True)]


def test_redact_headers_as_the_reference():
    fields = [(b"Host", b"api.example.com"), (b"Authorization", b"Bearer x"), (b"X-Api-Key", b"k"),
              (b"Accept", b"*/*"), (b"accept", b"text/html"), (b"Cookie", b"a=b"), (b"key", b"v"),
              (b"Keyboard", b"ok"), (b"X-Inject", b"secret-token"), (b"x-utf8", "é☃".encode()),
              (b"x-raw", b"\xff\xfe bytes"), (b"X-\xffName", b"v"), (b"SIG", b"s"), (b"X-Sig", b"s")]
    headers = http.Headers(fields)
    for extra in ("", "x-inject", "accept"):
        for _ in range(2):  # the second time from the name cache
            assert redact_headers(headers, extra) == reference_headers(headers, extra)
    assert ["X-Inject", REDACTED] in redact_headers(headers, "x-inject")
    assert ["X-Inject", "secret-token"] in redact_headers(headers, "")


def requests() -> list[http.Request]:
    out = [tutils.treq(), tutils.treq(host="example.com", port=8443, scheme=b"https"),
           tutils.treq(headers=http.Headers()), tutils.treq(authority=b"example.com:443", method=b"CONNECT",
                                                           path=b"", scheme=b""),
           tutils.treq(path=b"/a?b=c&token=t")]
    for host in ("example.com", "example.com:80", "example.com:8443", "[::1]:8080", "[::1]", "1.2.3.4:1",
                 "bücher.example", "xn--bcher-kva.example:443", "a" * 300, "bad host:x", "EXAMPLE.com"):
        for scheme in (b"http", b"https"):
            out.append(tutils.treq(scheme=scheme, headers=http.Headers(host=host), path=b"/p?q=1"))
    return out


@pytest.mark.parametrize("req", requests())
def test_pretty_url_as_mitmproxy(req):
    for _ in range(2):
        assert pretty_url(req) == req.pretty_url


def test_identity_of_gives_a_fresh_dict_each_time():
    ident = Identity(service_account="ns/sa", pod_namespace="ns", pod_name="p", on_behalf_of="bob",
                     on_behalf_of_groups=("g1", "g2"))
    first = identity_of(ident)
    assert first == {"namespace": "ns", "pod": "p", "serviceAccount": "sa", "onBehalfOf": "bob",
                     "onBehalfOfGroups": ["g1", "g2"]}
    first["pod"] = "changed"
    first["onBehalfOfGroups"].append("g3")
    assert identity_of(ident) == {"namespace": "ns", "pod": "p", "serviceAccount": "sa",
                                  "onBehalfOf": "bob", "onBehalfOfGroups": ["g1", "g2"]}
    assert identity_of(Identity()) is None


def test_format_time_as_strftime():
    rng = random.Random(16)
    zones = [UTC, timezone(timedelta(0)), timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    moments = [datetime(2026, 12, 5, 8, 0, 0, 0, tzinfo=UTC), datetime(1000, 1, 1, tzinfo=UTC),
               datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(5, 1, 2, tzinfo=UTC),
               datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime.now(UTC)]
    for _ in range(2000):
        moments.append(datetime.fromtimestamp(rng.uniform(-3e10, 2.5e11), tz=rng.choice(zones)))
    for moment in moments:
        if moment.astimezone(UTC).year < 1:
            continue
        assert format_time(moment) == moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), moment
    with pytest.raises(ValueError):
        format_time(datetime(2026, 1, 1))
