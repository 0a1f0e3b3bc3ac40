"""Credential sources: mounted Secret files (with kubelet-style rotation), redaction, and
AssumeRoleWithWebIdentity against moto's STS with refresh before expiry (injected clock)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from chaperone_sidecar.credentials import CredentialInjector
from chaperone_sidecar.credentials.aws_sigv4 import AWSResigner
from chaperone_sidecar.credentials.credential_sources import (
    AWSCredentials,
    CredentialsUnavailable,
    SecretDir,
    SecretValue,
    StaticAWSSource,
    TokenSource,
    WebIdentitySource,
)

from .conftest import AgentHarness

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEBYaDHsessiontokenEXAMPLE"


def kubelet_write(directory: Path, data: dict[str, str]) -> None:
    """What the kubelet's atomic writer does: new timestamped dir, swap ``..data``, links."""
    directory.mkdir(exist_ok=True)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    generation = directory / f"..{time.time_ns()}"
    generation.mkdir()
    for key, value in data.items():
        (generation / key).write_text(value)
    os.symlink(generation.name, directory / "..data_tmp")
    os.replace(directory / "..data_tmp", directory / "..data")
    for key in data:
        if not (directory / key).is_symlink():
            os.symlink(f"..data/{key}", directory / key)
    if old:
        shutil.rmtree(directory / old)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def fake_jwt(sub: str = "system:serviceaccount:agents:claude") -> str:
    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    header, claims = {"alg": "RS256", "kid": "k1"}, {"sub": sub, "aud": "sts.amazonaws.com"}
    return f"{b64(header)}.{b64(claims)}.sig"  # moto's STS does not verify the token


# -- redaction --------------------------------------------------------------------------------

def test_nothing_prints_secret_values(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    kubelet_write(tmp_path, {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE123456789",
                             "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN,
                             "token": TOKEN})
    value = SecretValue(SECRET)
    creds = AWSCredentials("AKIAEXAMPLE123456789", SECRET, TOKEN,
                           datetime(2030, 1, 1, tzinfo=timezone.utc))
    static = StaticAWSSource(tmp_path)
    static.current()
    token = TokenSource(tmp_path, "token")
    token.value()
    kubelet_write(tmp_path, {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE123456789",
                             "AWS_SECRET_ACCESS_KEY": SECRET + "2", "AWS_SESSION_TOKEN": TOKEN,
                             "token": TOKEN + "2"})
    static.current(), token.value()  # reload, which logs
    http = CredentialInjector.for_connection(
        {"type": "http", "hosts": ["x"], "credentials": {"source": "secret",
                                                          "secretRef": {"name": "s"}}}, tmp_path)
    aws = AWSResigner(static)
    printed = " ".join([repr(value), str(value), f"{value}", "%s" % (value,), repr(creds),
                        str(creds), repr(static), repr(token), repr(http), repr(aws),
                        repr(SecretDir(tmp_path, ["token"])), caplog.text])
    for secret in (SECRET, TOKEN, SECRET + "2", TOKEN + "2"):
        assert secret not in printed
    assert "AKIAEXAMPLE123456789" not in printed  # only the key id's tail is shown
    assert value.reveal() == SECRET and creds.secret_key == SECRET


def test_errors_name_keys_not_values(tmp_path):
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("AKIAEXAMPLE")
    with pytest.raises(CredentialsUnavailable) as err:
        StaticAWSSource(tmp_path).current()
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value) and "AKIAEXAMPLE" not in str(err.value)


# -- mounted Secret files -----------------------------------------------------------------------

def test_plain_files_are_reread_when_changed(tmp_path):
    (tmp_path / "token").write_text("one\n")
    token = TokenSource(tmp_path, "token")
    assert token.value().reveal() == "one"  # trailing newline stripped
    (tmp_path / "token").write_text("two")
    assert token.value().reveal() == "two"
    (tmp_path / "token").write_text("")
    with pytest.raises(CredentialsUnavailable, match="empty"):
        token.value()
    (tmp_path / "token").unlink()
    with pytest.raises(CredentialsUnavailable, match="not found"):
        token.value()


def test_kubelet_atomic_swap_is_seen_and_consistent(tmp_path):
    kubelet_write(tmp_path, {"AWS_ACCESS_KEY_ID": "AKIAOLD", "AWS_SECRET_ACCESS_KEY": "old"})
    source = StaticAWSSource(tmp_path)
    first = source.current()
    assert (first.access_key, first.secret_key, first.token) == ("AKIAOLD", "old", None)
    assert source.current() is first  # unchanged: cached object, no re-read
    kubelet_write(tmp_path, {"AWS_ACCESS_KEY_ID": "AKIANEW", "AWS_SECRET_ACCESS_KEY": "new",
                             "AWS_SESSION_TOKEN": "tok"})
    second = source.current()
    assert (second.access_key, second.secret_key, second.token) == ("AKIANEW", "new", "tok")


def test_secret_dir_reads_one_generation(tmp_path, monkeypatch):
    """Keys are read from the directory ``..data`` names, never half old and half new."""
    kubelet_write(tmp_path, {"a": "1", "b": "1"})
    secret = SecretDir(tmp_path, ["a", "b"])
    assert {k: v.reveal() for k, v in secret.values().items()} == {"a": "1", "b": "1"}
    kubelet_write(tmp_path, {"a": "2", "b": "2"})
    real_read = Path.read_text
    swapped = []

    def read_and_swap(self, *args, **kwargs):
        text = real_read(self, *args, **kwargs)
        if not swapped:  # the kubelet swaps right after the first key was read
            swapped.append(True)
            kubelet_write(tmp_path, {"a": "3", "b": "3"})
        return text

    monkeypatch.setattr(Path, "read_text", read_and_swap)
    values = {k: v.reveal() for k, v in secret.values().items()}
    assert values in ({"a": "2", "b": "2"}, {"a": "3", "b": "3"})


def test_optional_key(tmp_path):
    (tmp_path / "x").write_text("v")
    values = SecretDir(tmp_path, ["x", "y"], optional=["y"]).values()
    assert values["x"].reveal() == "v" and values["y"] is None


# -- web identity against moto's STS ------------------------------------------------------------

@pytest.fixture
def sts_unsigned(moto_auth):
    """moto's IAM emulation cannot serve the (legitimately unsigned) AssumeRoleWithWebIdentity
    while signature checking is on, so exactly the expected exchanges are let through."""
    yield moto_auth.allow_unauthenticated
    moto_auth.allow_unauthenticated(0)  # signature checking fully back on for later tests


def _web_identity(moto_auth, tmp_path: Path, clock, **kw) -> WebIdentitySource:
    kubelet_write(tmp_path / "projected", {"token": fake_jwt()})
    return WebIdentitySource(role_arn=moto_auth.role_arn, session_name="chaperone-test",
                             token=TokenSource(tmp_path / "projected", "token"),
                             endpoint_url=moto_auth.endpoint_url, clock=clock,
                             duration_seconds=900, **kw)


def test_web_identity_refreshes_before_expiry(moto_auth, tmp_path, sts_unsigned):
    clock = FakeClock()
    source = _web_identity(moto_auth, tmp_path, clock)

    async def scenario():
        sts_unsigned(1)
        first = await source.refresh()
        assert first.token and first.expiration > clock.now
        assert source.current() is first and not source.refresh_due()
        # 900 s credentials: the margin is capped at half the lifetime -> refresh after 450 s
        clock.now += timedelta(seconds=440)
        assert source.current() is first and source._inflight.done()
        clock.now += timedelta(seconds=20)
        assert source.refresh_due()
        sts_unsigned(1)
        assert source.current() is first  # still valid: served at once, refresh scheduled
        second = await source._inflight
        assert second.access_key != first.access_key and source.current() is second
        assert source.refreshes == 2
        return second

    creds = asyncio.run(scenario())
    # The refreshed credentials sign requests moto accepts (signature checking is on again).
    agent = AgentHarness(AWSResigner(source, endpoint_url=moto_auth.endpoint_url))
    source._refresh_at = clock.now + timedelta(hours=1)  # no more exchanges in this part
    ident = agent.client("sts").get_caller_identity()
    assert ident["Arn"].endswith(":assumed-role/agent-role/chaperone-test")
    assert agent.seen[-1].headers["x-amz-security-token"] == creds.token


def test_web_identity_failure_keeps_valid_credentials_until_expiry(moto_auth, tmp_path,
                                                                   sts_unsigned):
    clock = FakeClock()
    source = _web_identity(moto_auth, tmp_path, clock)

    async def scenario():
        sts_unsigned(1)
        first = await source.refresh()
        kubelet_write(tmp_path / "projected", {"other": "x"})  # token gone: refresh fails
        clock.now += timedelta(seconds=600)
        assert source.current() is first
        with pytest.raises(CredentialsUnavailable):
            await source._inflight
        assert "'token' not found" in source.last_error
        clock.now = first.expiration + timedelta(seconds=1)
        with pytest.raises(CredentialsUnavailable, match="expired"):
            source.current()
        if source._inflight is not None:  # the refresh current() kicked off fails as well
            with pytest.raises(CredentialsUnavailable):
                await source._inflight

    asyncio.run(scenario())


def test_web_identity_background_refresh_and_facade(moto_auth, tmp_path, sts_unsigned):
    """The background task refreshes on its own once the (injected) clock says it is time."""
    clock = FakeClock()
    spec = {"type": "aws", "credentials": {"source": "webIdentity"},
            "aws": {"roleArn": moto_auth.role_arn, "endpointURL": moto_auth.endpoint_url,
                    "region": "us-east-1"}}
    kubelet_write(tmp_path / "projected", {"token": fake_jwt()})
    injector = CredentialInjector.for_connection(
        spec, None, token_file=tmp_path / "projected" / "token", pod_name="claude-7", clock=clock)
    source = injector.source
    assert isinstance(source, WebIdentitySource) and source.session_name == "chaperone-claude-7"
    source.check_interval = 0.05

    async def scenario():
        sts_unsigned(2)
        await injector.start()
        first = source.current()
        clock.now = first.expiration - timedelta(minutes=14)  # inside the 15 min margin
        for _ in range(200):
            await asyncio.sleep(0.02)
            if source.refreshes == 2:
                break
        assert source.refreshes == 2 and source.current().access_key != first.access_key
        clock.now = datetime.now(timezone.utc)
        await injector.aclose()

    asyncio.run(scenario())
    ident = AgentHarness(injector).client("sts").get_caller_identity()
    assert ident["Arn"].endswith(":assumed-role/agent-role/chaperone-claude-7")


def test_concurrent_refreshes_share_one_exchange(moto_auth, tmp_path, sts_unsigned):
    source = _web_identity(moto_auth, tmp_path, FakeClock())

    async def scenario():
        sts_unsigned(1)
        results = await asyncio.gather(*(source.refresh() for _ in range(5)))
        assert all(r is results[0] for r in results)
        assert source.refreshes == 1

    asyncio.run(scenario())


def test_current_before_first_exchange_is_unavailable(tmp_path):
    (tmp_path / "token").write_text(fake_jwt())
    source = WebIdentitySource(role_arn="arn:aws:iam::123456789012:role/r", session_name="s",
                               token=TokenSource(tmp_path, "token"))
    with pytest.raises(CredentialsUnavailable, match="no credentials"):
        source.current()  # outside an event loop nothing is scheduled, nothing blocks
