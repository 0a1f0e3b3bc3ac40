"""Refusals of git requests in git's own wire format (the JSON body stays the record)."""

from __future__ import annotations

from chaperone_sidecar.addons.refusal import build, git_response
from chaperone_sidecar.gitwire import read_pkt
from chaperone_sidecar.policy.model import GitAction, GitCommand, RuleRef

RULE = RuleRef("agents/git", "main")
BODY = build("blocked", "no pushes to main", rule=RULE, how_to_get_access="ask the owners")


def pkts(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        p = read_pkt(data, pos)
        out.append(p.payload if p.kind == "data" else p.kind.encode())
        pos = p.end
    return out


def cmd(ref):
    return GitCommand(ref, "1" * 40, "2" * 40, "update", None)


def test_a_push_gets_ng_for_every_ref_over_side_band():
    git = GitAction("push", "org/app", "rpc", (cmd("refs/heads/main"), cmd("refs/heads/x")),
                    ("report-status", "side-band-64k"))
    resp = git_response("blocked", BODY, git)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-git-receive-pack-result"
    assert resp.headers["x-chaperone-refused"] == "blocked"
    bands = pkts(resp.content)
    assert bands[0].startswith(b"\x02Chaperone refused this push: chaperone_blocked: no pushes to main")
    inner = pkts(b"".join(b[1:] for b in bands if b[:1] == b"\x01"))
    reason = b"chaperone_blocked: no pushes to main (rule main of AccessPolicy agents/git)"
    assert inner == [b"unpack ok\n", b"ng refs/heads/main " + reason + b"\n", b"ng refs/heads/x " + reason + b"\n",
                     b"flush"]


def test_without_report_status_or_refs_it_is_an_error_git_prints():
    plain = GitAction("push", "org/app", "rpc", (cmd("refs/heads/main"),), ())
    assert pkts(git_response("blocked", BODY, plain).content)[0].startswith(b"ERR chaperone_blocked")
    unread = GitAction("push", "org/app", "rpc", None)
    first = pkts(git_response("blocked", BODY, unread).content)[0]
    assert first.startswith(b"\x03chaperone_blocked") and b"ref updates were not read" in first


def test_fetch_and_advertisements_get_err_with_their_content_type():
    adv = git_response("blocked", BODY, GitAction("fetch", "org/app", "advertisement"))
    assert adv.headers["content-type"] == "application/x-git-upload-pack-advertisement"
    assert pkts(adv.content) == [b"ERR chaperone_blocked: no pushes to main (rule main of AccessPolicy "
                                 b"agents/git) - ask the owners\n"]
    rpc = git_response("blocked", BODY, GitAction("fetch", "org/app", "rpc"))
    assert rpc.headers["content-type"] == "application/x-git-upload-pack-result"
