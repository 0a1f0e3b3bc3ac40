"""Where the sidecar's credentials come from: mounted Secret files, or AssumeRoleWithWebIdentity.

Why files: the webhook mounts the ClaudeConnection's Secret (and any projected service-account
token) into the sidecar container only, one file per key. Reading files instead of calling the
Kubernetes API keeps the sidecar's RBAC small and lets Kubernetes rotate values for us: the
kubelet updates a mounted Secret atomically by writing a new timestamped directory and swapping
the ``..data`` symlink to it. ``SecretDir`` notices the swap (one ``readlink`` per request, about
a microsecond) and re-reads every key from the *same* directory, so an access key id and its
secret can never be mixed from two generations. Directories without ``..data`` (a laptop, tests)
fall back to comparing each file's stat.

Why no secret ever leaks through ``repr``/``str``/logs: credential objects print redacted
(``SecretValue``, ``AWSCredentials``), and errors name files and keys, never values.

``WebIdentitySource`` exchanges a projected token for temporary AWS credentials with botocore's
STS client. The network call never runs on the event loop (``asyncio.to_thread``); ``current()``
only returns what is cached, and a background task (or ``current()`` itself, when it sees the
refresh time has passed) refreshes well before expiry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class CredentialError(Exception):
    """Base class: the request cannot be given credentials."""


class CredentialsUnavailable(CredentialError):
    """The sidecar holds no usable credentials right now (missing file, expired, STS down).

    The proxy should answer 503: the agent did nothing wrong and a retry may succeed.
    """


class InjectionError(CredentialError):
    """The agent's request cannot be re-signed as sent (malformed aws-chunked body, expired
    presigned URL, unknown service). The proxy should answer 400 with the message."""


class SecretValue:
    """A string that never prints itself. Call ``reveal()`` where the value is really needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def _mask_key_id(key_id: str) -> str:
    # An access key id is an identifier, not a secret, but the tail is enough to tell keys apart.
    return f"…{key_id[-4:]}" if len(key_id) > 4 else "…"


@dataclass(frozen=True)
class AWSCredentials:
    """One set of AWS credentials. Attribute names match botocore's ``Credentials``, so an
    instance can be handed to ``botocore.auth.SigV4Auth`` as is."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    expiration: datetime | None = None

    def __repr__(self) -> str:
        token = "<redacted>" if self.token else None
        return (f"AWSCredentials(access_key={_mask_key_id(self.access_key)!r}, "
                f"secret_key=<redacted>, token={token}, expiration={self.expiration!r})")

    __str__ = __repr__


class AWSCredentialSource(Protocol):
    """What the SigV4 re-signer needs: the current credentials, instantly, without I/O."""

    def current(self) -> AWSCredentials: ...


class SecretDir:
    """A mounted Secret (or projected volume): one file per key, re-read when it changes.

    Values are stripped of surrounding whitespace: ``kubectl create secret --from-file`` keeps a
    trailing newline, and no token, key or password we inject is meaningful with one.
    """

    def __init__(self, path: Path | str, keys: Sequence[str],
                 optional: Collection[str] = ()) -> None:
        self.path = Path(path)
        self.keys = tuple(keys)
        self.optional = frozenset(optional)
        self._version: tuple | None = None
        self._values: dict[str, SecretValue | None] = {}
        # Plain strings, not Path objects: this is checked on every request (Path joins cost
        # more than the system calls themselves).
        self._data_path = os.path.join(self.path, "..data")
        self._key_paths = tuple(os.path.join(self.path, key) for key in self.keys)
        self._lock = threading.Lock()  # apply() may be called from worker threads too

    def __repr__(self) -> str:
        return f"SecretDir({str(self.path)!r}, keys={list(self.keys)!r})"

    def _version_now(self) -> tuple:
        try:
            return ("link", os.readlink(self._data_path))
        except OSError:  # not a kubelet-managed mount: compare each file's stat
            pass
        sig: list[tuple[int, int, int, int] | None] = []
        for path in self._key_paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                sig.append(None)
            else:
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return ("stat", tuple(sig))

    def _read_all(self, version: tuple) -> dict[str, SecretValue | None]:
        # Read from the directory ..data points at, so all keys come from one generation.
        base = self.path / version[1] if version[0] == "link" else self.path
        values: dict[str, SecretValue | None] = {}
        for key in self.keys:
            try:
                raw = (base / key).read_text(encoding="utf-8")
            except FileNotFoundError:
                if key in self.optional:
                    values[key] = None
                    continue
                raise CredentialsUnavailable(
                    f"credential key {key!r} not found in {self.path}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialsUnavailable(
                    f"cannot read credential key {key!r} in {self.path}: "
                    f"{type(exc).__name__}") from None
            values[key] = SecretValue(raw.strip())
        return values

    def values(self) -> Mapping[str, SecretValue | None]:
        """Current values by key (``None`` for a missing optional key)."""
        version = self._version_now()
        if version == self._version and self._values:
            return self._values
        with self._lock:
            for _ in range(3):  # the old generation can vanish between readlink and read
                try:
                    values = self._read_all(version)
                except CredentialsUnavailable:
                    newer = self._version_now()
                    if newer == version:
                        raise
                    version = newer
                    continue
                if self._version is not None:
                    log.info("credentials in %s changed; reloaded keys %s",
                             self.path, ", ".join(self.keys))
                self._version, self._values = version, values
                return values
            raise CredentialsUnavailable(f"credentials in {self.path} keep changing")


class TokenSource:
    """One token (bearer token, API key, projected service-account token) read from a file."""

    def __init__(self, directory: Path | str, key: str) -> None:
        self._dir = SecretDir(directory, [key])
        self.key = key

    @classmethod
    def from_file(cls, path: Path | str) -> TokenSource:
        path = Path(path)
        return cls(path.parent, path.name)

    def __repr__(self) -> str:
        return f"TokenSource({str(self._dir.path / self.key)!r})"

    def value(self) -> SecretValue:
        token = self._dir.values()[self.key]
        assert token is not None  # the key is not optional
        if not token:
            raise CredentialsUnavailable(
                f"credential key {self.key!r} in {self._dir.path} is empty")
        return token


class StaticAWSSource:
    """Long-lived AWS keys from a mounted Secret (keys named by the connection's secretRef)."""

    def __init__(self, directory: Path | str, *, access_key_id_key: str = "AWS_ACCESS_KEY_ID",
                 secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY",
                 session_token_key: str = "AWS_SESSION_TOKEN") -> None:
        self._keys = (access_key_id_key, secret_access_key_key, session_token_key)
        self._dir = SecretDir(directory, self._keys, optional=[session_token_key])
        self._cached: tuple[Mapping, AWSCredentials] | None = None

    def __repr__(self) -> str:
        return f"StaticAWSSource({str(self._dir.path)!r})"

    def current(self) -> AWSCredentials:
        values = self._dir.values()
        if self._cached is not None and self._cached[0] is values:
            return self._cached[1]
        akid, secret, token = (values[k] for k in self._keys)
        if not akid or not secret:
            raise CredentialsUnavailable(f"AWS key id or secret in {self._dir.path} is empty")
        creds = AWSCredentials(akid.reveal(), secret.reveal(), token.reveal() if token else None)
        self._cached = (values, creds)
        return creds


class WebIdentitySource:
    """Temporary AWS credentials from AssumeRoleWithWebIdentity with a projected token.

    Refresh policy: at ``expiration - margin`` where margin is ``refresh_margin`` (15 minutes,
    like botocore's advisory refresh) but at most half the credentials' lifetime, so short
    sessions are renewed halfway. A failed refresh is retried with backoff while the cached
    credentials are still valid; only once they have expired does ``current()`` refuse.
    """

    def __init__(self, *, role_arn: str, token: TokenSource, session_name: str,
                 region: str = "us-east-1", endpoint_url: str | None = None,
                 duration_seconds: int = 3600, refresh_margin: timedelta = timedelta(minutes=15),
                 clock: Clock = utcnow, check_interval: float = 60.0,
                 client_factory: Callable[[], object] | None = None) -> None:
        self.role_arn = role_arn
        self.session_name = session_name
        self.region = region
        self.endpoint_url = endpoint_url
        self.duration_seconds = duration_seconds
        self.refresh_margin = refresh_margin
        self.check_interval = check_interval
        self._token = token
        self._clock = clock
        self._client_factory = client_factory or self._default_client
        self._client: object | None = None
        self._client_lock = threading.Lock()
        self._creds: AWSCredentials | None = None
        self._refresh_at: datetime | None = None
        self._inflight: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self.refreshes = 0  # completed exchanges, for metrics and tests
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return (f"WebIdentitySource(role_arn={self.role_arn!r}, session={self.session_name!r}, "
                f"credentials={self._creds!r})")

    # -- the STS call (runs in a worker thread) --------------------------------------------
    def _default_client(self) -> object:
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        # AssumeRoleWithWebIdentity is an unsigned call: the token is the proof. UNSIGNED also
        # keeps botocore from looking for credentials in the sidecar's own environment.
        return botocore.session.get_session().create_client(
            "sts", region_name=self.region, endpoint_url=self.endpoint_url,
            config=Config(signature_version=UNSIGNED, retries={"max_attempts": 3},
                          connect_timeout=5, read_timeout=10))

    def _fetch(self) -> AWSCredentials:
        with self._client_lock:
            if self._client is None:
                self._client = self._client_factory()
        try:
            resp = self._client.assume_role_with_web_identity(  # type: ignore[attr-defined]
                RoleArn=self.role_arn, RoleSessionName=self.session_name,
                WebIdentityToken=self._token.value().reveal(),
                DurationSeconds=self.duration_seconds)
        except CredentialError:
            raise
        except Exception as exc:  # botocore's errors carry no secrets, but keep only the type
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            raise CredentialsUnavailable(
                f"AssumeRoleWithWebIdentity for {self.role_arn} failed: "
                f"{type(exc).__name__} {code}".rstrip()) from None
        c = resp["Credentials"]
        expiration = c["Expiration"]
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        return AWSCredentials(c["AccessKeyId"], c["SecretAccessKey"], c.get("SessionToken"),
                              expiration)

    # -- state -------------------------------------------------------------------------------
    def _install(self, creds: AWSCredentials) -> None:
        now = self._clock()
        assert creds.expiration is not None
        lifetime = max(creds.expiration - now, timedelta(0))
        self._creds = creds
        self._refresh_at = creds.expiration - min(self.refresh_margin, lifetime / 2)
        self.refreshes += 1
        self.last_error = None
        log.info("assumed %s (session %s); credentials expire %s, refresh at %s",
                 self.role_arn, self.session_name, creds.expiration.isoformat(),
                 self._refresh_at.isoformat())

    def refresh_due(self) -> bool:
        return self._refresh_at is None or self._clock() >= self._refresh_at

    def refresh_blocking(self) -> AWSCredentials:
        """Exchange the token now, in this thread (for CLIs and start-up outside a loop)."""
        self._install(self._fetch())
        assert self._creds is not None
        return self._creds

    async def refresh(self) -> AWSCredentials:
        """Exchange the token off the event loop; concurrent callers share one exchange."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._refresh_once())
        return await asyncio.shield(self._inflight)

    async def _refresh_once(self) -> AWSCredentials:
        try:
            creds = await asyncio.to_thread(self._fetch)
        except CredentialError as exc:
            self.last_error = str(exc)
            raise
        self._install(creds)
        return creds

    def current(self) -> AWSCredentials:
        creds = self._creds
        if self.refresh_due() and (self._inflight is None or self._inflight.done()):
            self._kick()
        if creds is None:
            raise CredentialsUnavailable(
                f"no credentials for {self.role_arn} yet"
                + (f" ({self.last_error})" if self.last_error else ""))
        if creds.expiration is not None and self._clock() >= creds.expiration:
            raise CredentialsUnavailable(
                f"credentials for {self.role_arn} expired and could not be refreshed"
                + (f" ({self.last_error})" if self.last_error else ""))
        return creds

    def _kick(self) -> None:
        # Called from apply() inside the proxy's event loop: schedule, never wait.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._inflight = loop.create_task(self._refresh_once())
        self._inflight.add_done_callback(_swallow)

    # -- background refresh ----------------------------------------------------------------
    async def start(self) -> None:
        """First exchange (raises if it fails), then keep refreshing in a background task."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failures = 0
        while True:
            assert self._refresh_at is not None
            if failures:
                delay = float(min(2 ** failures, 60))
            else:
                delay = (self._refresh_at - self._clock()).total_seconds()
            # Wake at least every check_interval: expiry is wall-clock time, which can jump
            # (suspend/resume, NTP) while a monotonic sleep is running.
            await asyncio.sleep(min(max(delay, min(1.0, self.check_interval)),
                                    self.check_interval))
            if not self.refresh_due():
                continue
            try:
                await self.refresh()
                failures = 0
            except CredentialError as exc:
                failures += 1
                log.warning("refreshing web-identity credentials failed (attempt %d): %s",
                            failures, exc)

    async def aclose(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, CredentialError):
                    pass
        self._task = None


def _swallow(task: asyncio.Task) -> None:
    # A refresh kicked by current() reports through last_error and the log, not the loop.
    if not task.cancelled() and task.exception() is not None:
        log.warning("refreshing web-identity credentials failed: %s", task.exception())
