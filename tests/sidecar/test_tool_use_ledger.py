"""Linking an action to the tool_use that preceded it: content match, window, bounds, per pod."""

from __future__ import annotations

from chaperone_sidecar.policy.matching_tool_use import ToolUse
from chaperone_sidecar.policy.model import Action, AWSAction, Identity, KubernetesAction
from chaperone_sidecar.tool_use_ledger import Candidate, ToolUseLedger, action_terms, candidate_text

POD = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0", pod_uid="u1")
OTHER = Identity(service_account="team-b/claude", pod_namespace="team-b", pod_name="agent-0", pod_uid="u2")


def cand(tid: str, value: dict, at: float = 100.0, name: str = "bash") -> Candidate:
    return Candidate(id=tid, name=name, text=candidate_text(ToolUse(tid, name, value)), at=at, flow="f-llm")


def s3(operation: str, resources: tuple[str, ...], method: str = "DELETE") -> Action:
    return Action("aws", method, "https", "prod-logs.s3.amazonaws.com", 443, "/", name=f"s3:{operation}",
                  aws=AWSAction("s3", "us-east-1", operation, "rest-xml", resources))


def test_aws_cli_words_link_the_s3_call():
    ledger = ToolUseLedger()
    ledger.add(POD, cand("toolu_ls", {"command": "aws s3 ls"}, at=100))
    ledger.add(POD, cand("toolu_rb", {"command": "aws s3 rb s3://prod-logs --force"}, at=101))
    ledger.add(POD, cand("toolu_cat", {"command": "cat README.md"}, at=102))
    link = ledger.link(POD, action_terms(s3("DeleteBucket", ("prod-logs",))), now=105)
    assert link is not None and link.candidate.id == "toolu_rb"
    assert "AWS CLI s3 rb" in link.reason and "resource prod-logs" in link.reason and link.score >= 0.8
    event = link.to_event()
    assert event["toolUseId"] == "toolu_rb" and event["name"] == "bash" and event["flow"] == "f-llm"
    # the SDK spelling links too; the better match wins over the newer one
    ledger.add(POD, cand("toolu_py", {"code": "s3.delete_bucket(Bucket='prod-logs')"}, at=106, name="python"))
    assert ledger.link(POD, action_terms(s3("DeleteBucket", ("prod-logs",))), now=107).candidate.id == "toolu_rb"
    sdk = ToolUseLedger()
    sdk.add(POD, cand("toolu_py", {"code": "s3.delete_bucket(Bucket='prod-logs')"}, at=106, name="python"))
    link = sdk.link(POD, action_terms(s3("DeleteBucket", ("prod-logs",))), now=107)
    assert link.candidate.id == "toolu_py" and "SDK delete_bucket" in link.reason


def test_http_and_kubectl_links():
    ledger = ToolUseLedger()
    ledger.add(POD, cand("toolu_curl", {"command": "curl -X POST https://tickets.example.com/api/tickets/42/close"}))
    ledger.add(POD, cand("toolu_k", {"command": "kubectl -n prod delete deployment web-frontend"}))
    http = Action("http", "POST", "https", "tickets.example.com", 443, "/api/tickets/42/close", name="http:POST")
    link = ledger.link(POD, action_terms(http), now=110)
    assert link.candidate.id == "toolu_curl" and "host tickets.example.com" in link.reason
    kube = Action("kubernetes", "DELETE", "https", "10.0.0.1", 443,
                  "/apis/apps/v1/namespaces/prod/deployments/web-frontend",
                  kubernetes=KubernetesAction("delete", "apps", "v1", "deployments", "", "prod", "web-frontend"))
    link = ledger.link(POD, action_terms(kube), now=110)
    assert link.candidate.id == "toolu_k" and "name web-frontend" in link.reason and "kubectl delete" in link.reason


def test_no_content_match_no_link_and_weak_matches_are_not_enough():
    ledger = ToolUseLedger()
    ledger.add(POD, cand("toolu_1", {"command": "make test"}))
    telemetry = Action("http", "POST", "https", "statsig.anthropic.com", 443, "/v1/rgstr", name="http:POST")
    assert ledger.link(POD, action_terms(telemetry), now=101) is None
    ledger.add(POD, cand("toolu_2", {"note": "post something"}))  # only the method word: 0.1
    assert ledger.link(POD, action_terms(telemetry), now=101) is None


def test_window_pods_and_bounds():
    ledger = ToolUseLedger(window=120, per_pod=3, pods=2)
    ledger.add(POD, cand("old", {"command": "aws s3 rb s3://prod-logs"}, at=0))
    terms = action_terms(s3("DeleteBucket", ("prod-logs",)))
    assert ledger.link(POD, terms, now=100).candidate.id == "old"
    assert ledger.link(POD, terms, now=121) is None  # outside the window (and dropped)
    assert ledger.candidates(POD, now=121) == []
    ledger.add(OTHER, cand("theirs", {"command": "aws s3 rb s3://prod-logs"}, at=200))
    assert ledger.link(POD, terms, now=201) is None  # another pod's tool_use is not ours
    for i in range(5):
        ledger.add(POD, cand(f"t{i}", {"command": f"echo {i}"}, at=300 + i))
    assert [c.id for c in ledger.candidates(POD, now=305)] == ["t4", "t3", "t2"]
    ledger.add(Identity(pod_namespace="x", pod_name="y"), cand("z", {}, at=306))
    assert ledger.candidates(OTHER, now=306) == []  # least recently used pod dropped
