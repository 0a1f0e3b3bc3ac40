"""Digests of git pushes: the ref updates, not the pack's bytes; an unreadable push is unique."""

from __future__ import annotations

from chaperone_sidecar.approvals.digest import request_digest
from chaperone_sidecar.policy.model import HTTPRequest

OLD, NEW, OTHER = "1" * 40, "2" * 40, "3" * 40


def pkt(line: bytes) -> bytes:
    return b"%04x" % (len(line) + 4) + line


def push(new: str = NEW, pack: bytes = b"PACK...", ref: str = "refs/heads/main", caps: str = "report-status",
         path: str = "/org/app.git/git-receive-pack") -> HTTPRequest:
    body = pkt(f"{OLD} {new} {ref}\0{caps}\n".encode()) + b"0000" + pack
    return HTTPRequest("POST", "https", "git.example", 443, path, "",
                       (("content-type", "application/x-git-receive-pack-request"),), body)


def test_the_same_ref_updates_are_the_same_push_whatever_the_pack():
    assert request_digest(push(pack=b"PACK-one")) == request_digest(push(pack=b"PACK-two"))
    assert request_digest(push(caps="report-status agent=git/2.45")) == request_digest(push())


def test_another_update_is_another_push():
    base = request_digest(push())
    assert request_digest(push(new=OTHER)) != base
    assert request_digest(push(ref="refs/heads/prod")) != base
    assert request_digest(push(path="/org/other.git/git-receive-pack")) != base


def test_a_push_whose_updates_were_not_read_never_shares_a_digest():
    streamed = HTTPRequest("POST", "https", "git.example", 443, "/org/app.git/git-receive-pack", "",
                           (("content-type", "application/x-git-receive-pack-request"),), b"")
    assert request_digest(streamed) != request_digest(streamed)


def test_other_requests_keep_their_body_digest():
    fetch = HTTPRequest("POST", "https", "git.example", 443, "/org/app.git/git-upload-pack", "", (), b"0000")
    assert request_digest(fetch) == request_digest(fetch)
    assert request_digest(fetch) != request_digest(HTTPRequest("POST", "https", "git.example", 443,
                                                               "/org/app.git/git-upload-pack", "", (), b"0001"))
