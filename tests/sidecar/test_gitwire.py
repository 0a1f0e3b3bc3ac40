"""git's pkt-line framing, side-band and report-status as the sidecar writes and reads them."""

from __future__ import annotations

import pytest

from chaperone_sidecar.gitwire import PktError, Truncated, err_pkt, pkt, read_pkt, report_status


def pkts(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        p = read_pkt(data, pos)
        out.append((p.kind, p.payload))
        pos = p.end
    return out


def test_read_and_write_pkt_lines():
    assert pkt(b"hello\n") == b"000ahello\n"
    assert pkts(b"000ahello\n000000010002") == [("data", b"hello\n"), ("flush", b""), ("delim", b""),
                                                ("end", b"")]
    with pytest.raises(Truncated):
        read_pkt(b"000ahel")
    with pytest.raises(Truncated):
        read_pkt(b"00")
    for bad in (b"zzzz", b"0003", b"+00a", b" 00a"):
        with pytest.raises(PktError):
            read_pkt(bad)
    with pytest.raises(ValueError):
        pkt(b"x" * 70000)


def test_report_status_without_side_band():
    out = report_status([("refs/heads/main", "blocked: no\nnewlines"), ("refs/heads/x", None)],
                        capabilities=["report-status"], progress=["not sent"])
    assert pkts(out) == [("data", b"unpack ok\n"), ("data", b"ng refs/heads/main blocked: no newlines\n"),
                         ("data", b"ok refs/heads/x\n"), ("flush", b"")]


def test_report_status_over_side_band_64k():
    out = report_status([("refs/heads/main", "why")], capabilities=["report-status", "side-band-64k"],
                        progress=["line one", "line two"])
    bands = pkts(out)
    assert bands[0] == ("data", b"\x02line one\nline two\n")
    inner = b"".join(p[1:] for kind, p in bands if kind == "data" and p[:1] == b"\x01")
    assert pkts(inner) == [("data", b"unpack ok\n"), ("data", b"ng refs/heads/main why\n"), ("flush", b"")]
    assert bands[-1] == ("flush", b"")


def test_side_band_splits_long_text():
    out = report_status([("r", "x")], capabilities=["side-band"], progress=["y" * 3000])
    assert all(len(p) <= 1000 for kind, p in pkts(out) if kind == "data")


def test_err_is_one_line():
    assert pkts(err_pkt("no\r\nway\x00")) == [("data", b"ERR no way?\n")]
