"""proof.check and ProofCache, pure: each binding of a grant to its ApprovalRequest."""

from __future__ import annotations

import dataclasses

from chaperone_sidecar.approvals.digest import action_key, request_digest
from chaperone_sidecar.approvals.grants import Grant
from chaperone_sidecar.approvals.objects import build_request
from chaperone_sidecar.approvals.proof import ProofCache, check
from chaperone_sidecar.timefmt import rfc3339_to_epoch

from .conftest import RULE, http_action, http_request, identity, requirement

NOW = 1_900_000_000.0
WHO = identity("team")
CONN = "example-api"
DIGEST = request_digest(http_request())


def approved(scope: str = "exact", ttl: int = 900, **spec) -> dict:
    obj = build_request(name="http-delete-1", identity=WHO, connection=CONN, action=http_action(),
                        digest=DIGEST, rule=RULE, now=NOW - 60,
                        requirement=requirement(grant_scope=scope, grant_ttl_seconds=ttl))
    obj["spec"].update({"decision": "Approved", "decidedBy": "alice",
                        "decidedAt": "2030-03-17T17:45:00Z", **spec})
    return obj


DECIDED = rfc3339_to_epoch("2030-03-17T17:45:00Z")


def grant(scope="exact", request="http-delete-1", expires=None) -> Grant:
    return Grant(scope, request, ("alice",), DECIDED + 900 if expires is None else expires)


def at(seconds: float) -> float:
    return DECIDED + seconds


def test_a_true_grant_is_proven_until_the_requests_window_ends():
    proof, why = check(approved(), grant(), scope="exact", key=DIGEST, identity=WHO,
                       connection=CONN, now=at(10))
    assert why == "" and proof.end == DECIDED + 900 and proof.approvers == ("alice",)
    assert check(approved(), grant(), scope="exact", key=DIGEST, identity=WHO, connection=CONN,
                 now=at(900))[1].endswith("grant ended at 2030-03-17T18:00:00Z")


def test_every_binding_is_checked():
    def why(obj=None, g=None, scope="exact", key=DIGEST, who=WHO, conn=CONN):
        return check(approved() if obj is None else obj, g or grant(), scope=scope, key=key,
                     identity=who, connection=conn, now=at(10))[1]

    assert "which does not exist" in check(None, grant(), scope="exact", key=DIGEST, identity=WHO,
                                           connection=CONN, now=at(10))[1]
    pending = approved()
    for field in ("decision", "decidedBy", "decidedAt"):
        del pending["spec"][field]
    assert why(pending) == "ApprovalRequest http-delete-1 is pending, not approved"
    assert "is denied" in why(approved(decision="Denied"))
    assert "not sha256:" in why(key="sha256:" + "0" * 64)  # replayed to another digest
    assert "spec.requester.creator is 'dave'" in why(who=dataclasses.replace(WHO, creator="eve"))
    assert "spec.connection" in why(conn="other-api")
    assert "spec.requester.onBehalfOf is ''" in why(who=dataclasses.replace(WHO, on_behalf_of="bob"))
    akey = action_key(CONN, http_action())
    assert "granted scope 'exact', the grant claims 'action'" in why(g=grant("action"), scope="action",
                                                                    key=akey)
    assert "stored under an 'action' key" in why(g=grant("exact"), scope="action", key=akey)
    assert "claims to last until" in why(g=grant(expires=DECIDED + 86400))
    # action scope: the request's own action, not another one
    action_ok = check(approved("action"), grant("action"), scope="action", key=akey, identity=WHO,
                      connection=CONN, now=at(10))
    assert action_ok[1] == ""
    other = action_key(CONN, http_action(path="/v1/things/43"))
    assert "approved another action" in why(approved("action"), grant("action"), "action", other)


def test_the_cache_keeps_approved_requests_briefly():
    clock = [0.0]
    cache = ProofCache(fresh_seconds=10, size=2, clock=lambda: clock[0])
    pending = approved()
    del pending["spec"]["decision"]
    cache.put(pending)
    assert cache.get("http-delete-1") is None  # only approvals are remembered
    cache.put(approved())
    assert cache.get("http-delete-1") is not None
    clock[0] = 11
    assert cache.get("http-delete-1") is None  # a deletion (revocation) shows within 10 s
