"""A real PostgreSQL server for the postgres connection tests: Debian's ``postgresql`` package.

``PostgresServer().start()`` runs ``initdb`` into a temporary directory (SCRAM-SHA-256 for every
TCP login, a superuser ``postgres`` with a random password), writes a CA and a server
certificate for ``localhost``/``127.0.0.1`` (``ssl = on``: the sidecar's ``sslmode`` require and
verify-full are tested against it), and starts ``postgres`` on a free loopback port. The unix
socket is off: every client goes through TCP and so through ``pg_hba.conf``'s SCRAM line.

PostgreSQL refuses to run as root. **Decision**: when the test bed runs as root (CI
containers), the server runs as ``nobody`` (``runuser -u nobody``), whose data directory is
made its own; otherwise as the current user. A missing package is :class:`ComponentUnavailable`
- the test bed's conftest turns that into a failure, never a skip.

Helpers: :meth:`PostgresServer.psql` (the real ``psql`` from ``postgresql-client``, as the
superuser) and :meth:`PostgresServer.create_user` (a login role with a password, stored as a
SCRAM verifier).
"""

from __future__ import annotations

import datetime as dt
import glob
import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .services import LOOPBACK, ComponentUnavailable, _Service

__all__ = ["PostgresServer", "postgres_bin_dir"]

RUN_AS_ROOT_USER = "nobody"


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has initdb and postgres."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for path in reversed(candidates):
        if (Path(path) / "initdb").is_file() and (Path(path) / "postgres").is_file():
            return Path(path)
    raise ComponentUnavailable("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; "
                               "install the Debian package postgresql (make deps does)")


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for localhost/127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chaperone test bed postgres CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class PostgresServer(_Service):
    """One PostgreSQL cluster on a free loopback port (see the module docstring)."""

    name = "postgres"

    def __init__(self, *, port: int | None = None, startup_timeout: float = 60.0) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        self.password = secrets.token_urlsafe(18)
        self.superuser = "postgres"
        self.ca_file: Path | None = None
        self._bin: Path | None = None
        self._as: list[str] = []

    # ------------------------------------------------------------------ _Service
    def _check_installed(self) -> None:
        self._bin = postgres_bin_dir()
        if shutil.which("psql") is None or shutil.which("pg_isready") is None:
            raise ComponentUnavailable("psql/pg_isready not found; install the Debian package "
                                       "postgresql-client (make deps does)")
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise ComponentUnavailable("running as root needs runuser (util-linux) to start "
                                           "postgres as nobody")
            self._as = ["runuser", "-u", RUN_AS_ROOT_USER, "--"]
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="chaperone-postgres-"))
            self._initdb()

    def _own(self, *paths: Path) -> None:
        if not self._as:
            return
        import pwd

        entry = pwd.getpwnam(RUN_AS_ROOT_USER)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        assert self.workdir is not None and self._bin is not None
        data = self.workdir / "data"
        pwfile = self.workdir / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self.ca_file, cert, key = _certificates(self.workdir)
        self.workdir.chmod(0o755)
        self.ca_file.chmod(0o644)
        self._own(self.workdir, pwfile, cert, key)
        result = subprocess.run(
            [*self._as, str(self._bin / "initdb"), "-D", str(data), "-U", self.superuser,
             "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"],
            capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            from .services import StartupError

            raise StartupError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        pwfile.unlink()
        with open(data / "pg_hba.conf", "w") as hba:
            hba.write("# chaperone test bed: every login over TCP with SCRAM-SHA-256\n"
                      "host all all 127.0.0.1/32 scram-sha-256\n"
                      "host all all ::1/128 scram-sha-256\n")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{LOOPBACK}'\nunix_socket_directories = ''\n"
                       f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n"
                       "password_encryption = 'scram-sha-256'\nfsync = off\n"
                       "shared_buffers = 16MB\nmax_connections = 50\n")

    def _argv(self) -> list[str]:
        assert self.workdir is not None and self._bin is not None
        return [*self._as, str(self._bin / "postgres"), "-D", str(self.workdir / "data"),
                "-p", str(self.port), "-c", "log_min_messages=warning"]

    def _probe(self) -> bool:
        return subprocess.run(["pg_isready", "-q", "-h", LOOPBACK, "-p", str(self.port)],
                              timeout=5).returncode == 0

    # ------------------------------------------------------------------ helpers
    @property
    def host(self) -> str:
        return LOOPBACK

    def psql(self, sql: str, *, database: str = "postgres", user: str | None = None,
             password: str | None = None) -> str:
        """Run ``sql`` with the real psql (as the superuser unless told); stdout, or raise."""
        env = {**os.environ, "PGPASSWORD": password or self.password, "PGSSLMODE": "disable"}
        result = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", LOOPBACK, "-p", str(self.port),
             "-U", user or self.superuser, "-d", database, "-c", sql],
            capture_output=True, text=True, env=env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_user(self, name: str, password: str, *, database: str | None = None) -> None:
        """A login role (SCRAM verifier) and, when given, a database it owns."""
        quoted = password.replace("'", "''")
        self.psql(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{quoted}'")
        if database:
            self.psql(f'CREATE DATABASE "{database}" OWNER "{name}"')
