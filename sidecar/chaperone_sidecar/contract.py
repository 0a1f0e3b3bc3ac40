"""The injection contract: every name, path and variable the webhook writes into a pod.

One module, imported by both sides: the operator's injection (``chaperone_operator.injection``)
writes these names into the pod, the sidecar's :mod:`.config` reads them back. The sidecar
package never imports the operator, the operator may import the sidecar package, so the contract
lives here. It holds constants only (names, mount paths, defaults); the parsers of the JSON
values (``CHAPERONE_CREATOR``, ``CHAPERONE_CONNECTIONS``) are in :mod:`.config`.

``docs/injection.md`` documents exactly this module (tests/operator/injection/test_inject.py
asserts every string constant below appears there). The API group, version, plurals and labels
are in :mod:`.api`.

Written by the webhook only when the operator is configured with an issuer:
``CHAPERONE_OIDC_ISSUER``, ``CHAPERONE_OIDC_AUDIENCE``, ``CHAPERONE_OIDC_USERNAME_CLAIM``
(default ``sub``), ``CHAPERONE_OIDC_GROUPS_CLAIM`` (default ``groups``) and, when set,
``CHAPERONE_OIDC_CA_FILE``: the issuer that on-behalf-of tokens (``X-Chaperone-On-Behalf-Of``)
are verified against. Without an issuer such a token is refused (401) - never silently ignored.
"""

from __future__ import annotations

# --- annotations (pod metadata; the opt-in label is api.LABEL_INJECT) ---------------------------
STATUS_ANNOTATION = "chaperone.dev/status"         # JSON: what was injected (written by webhook)
CREATOR_ANNOTATION = "chaperone.dev/creator"       # JSON: admission userInfo (written by webhook)
MODE_ANNOTATION = "chaperone.dev/mode"             # input: explicit | transparent
APPROVAL_MODE_ANNOTATION = "chaperone.dev/approval-mode"  # input: hold | defer

MODES = ("explicit", "transparent")
APPROVAL_MODES = ("hold", "defer")

# Names starting with this prefix (containers, volumes) belong to the webhook: whatever a client
# sent under such a name is replaced or removed, so nobody can pre-seed a fake sidecar.
RESERVED_PREFIX = "chaperone-"

# --- containers ------------------------------------------------------------------------------
SIDECAR_NAME = "chaperone-sidecar"   # native sidecar (initContainer, restartPolicy Always)
INIT_NAME = "chaperone-init"         # transparent mode only: installs iptables rules
SIDECAR_COMMAND = ["chaperone"]
SIDECAR_SUBCOMMAND = "sidecar"

# --- volumes (pod) ---------------------------------------------------------------------------
VOL_CA = "chaperone-ca"                 # Secret <ca secret>: interception CA key + cert (sidecar)
VOL_TRUST = "chaperone-trust"           # ConfigMap <trust bundle>: CA certs (agents)
VOL_TOKEN = "chaperone-token"           # projected SA token, kube-root-ca.crt, namespace (sidecar)
VOL_WEBIDENTITY = "chaperone-webidentity"  # projected tokens of aws webIdentity connections
VOL_SPOOL = "chaperone-spool"           # emptyDir: recording write-ahead spool (sidecar)
VOL_TMP = "chaperone-tmp"               # emptyDir: /tmp and HOME (read-only root filesystem)
VOL_PODINFO = "chaperone-podinfo"       # downwardAPI: labels, annotations, creator (sidecar)
VOL_SIDECAR_SECRET = "chaperone-sidecar-secret"  # optional Secret: S3/Redis credentials (sidecar)
VOL_CONN_PREFIX = "chaperone-conn-"     # + hash(connection name): connection credentials Secret
VOL_UPSTREAM_CA_PREFIX = "chaperone-upca-"  # + hash(connection name): connection upstreamCA

# --- mount paths -----------------------------------------------------------------------------
TRUST_DIR = "/etc/chaperone/trust"               # agents: trust bundle directory (whole ConfigMap)
TRUST_KEY = "ca.crt"                              # key in the trust-bundle ConfigMap
TRUST_FILE = f"{TRUST_DIR}/{TRUST_KEY}"          # what SSL_CERT_FILE & co. point at
CA_DIR = "/etc/chaperone/ca"                     # sidecar: mitmproxy confdir (read-only)
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # sidecar only: the standard path
WEBIDENTITY_DIR = "/var/run/secrets/chaperone/webidentity"   # + /<connection>/token
CONNECTIONS_DIR = "/var/run/secrets/chaperone/connections"   # + /<connection>/<secret keys>
SIDECAR_SECRET_DIR = "/var/run/secrets/chaperone/sidecar"
UPSTREAM_CA_DIR = "/etc/chaperone/upstream-ca"               # + /<connection>/ca.crt
PODINFO_DIR = "/etc/chaperone/podinfo"                       # labels, annotations, creator
SPOOL_DIR = "/var/lib/chaperone/spool"
TMP_DIR = "/tmp"
# Where the ServiceAccount admission plugin mounts the API token into every container.
SA_TOKEN_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_PLUGIN_VOLUME_PREFIX = "kube-api-access-"

# --- agent container environment -------------------------------------------------------------
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
NO_PROXY_DEFAULTS = ("localhost", "127.0.0.1", "::1")
CA_VARS = (
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "AWS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
)
PLACEHOLDER = "chaperone-placeholder"
AWS_PLACEHOLDER_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Any of these in a container's env means the user configured AWS credentials some other way.
AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
AWS_REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
ANTHROPIC_BASE_URL_VAR = "ANTHROPIC_BASE_URL"
# postgres connections: libpq's (and psycopg's, node-postgres's) defaults point at the sidecar's
# listener; the port of the n-th postgres connection by name is POSTGRES_PORT_BASE + n unless
# its spec.postgres.listenPort says otherwise (chaperone_sidecar/postgres/server.py).
POSTGRES_HOST_VAR = "PGHOST"
POSTGRES_PORT_VAR = "PGPORT"
POSTGRES_PORT_BASE = 5432
ANTHROPIC_KEY_VAR = "ANTHROPIC_API_KEY"
ANTHROPIC_CREDENTIAL_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")

# --- sidecar container environment -----------------------------------------------------------
ENV_POD_NAME = "CHAPERONE_POD_NAME"
ENV_POD_NAMESPACE = "CHAPERONE_POD_NAMESPACE"
ENV_POD_UID = "CHAPERONE_POD_UID"
ENV_SERVICE_ACCOUNT = "CHAPERONE_SERVICE_ACCOUNT"
ENV_NODE_NAME = "CHAPERONE_NODE_NAME"
ENV_CREATOR = "CHAPERONE_CREATOR"
ENV_CONNECTIONS = "CHAPERONE_CONNECTIONS"
ENV_CA_DIR = "CHAPERONE_CA_DIR"
ENV_TOKEN_DIR = "CHAPERONE_TOKEN_DIR"
ENV_PODINFO_DIR = "CHAPERONE_PODINFO_DIR"
ENV_SPOOL_DIR = "CHAPERONE_SPOOL_DIR"
ENV_SPOOL_LIMIT = "CHAPERONE_SPOOL_LIMIT_BYTES"  # the emptyDir sizeLimit, in bytes
ENV_APPROVAL_MODE = "CHAPERONE_APPROVAL_MODE"
ENV_APPROVAL_TIMEOUT = "CHAPERONE_APPROVAL_TIMEOUT_SECONDS"
ENV_OPERATOR_NAMESPACE = "CHAPERONE_OPERATOR_NAMESPACE"
ENV_LOG_LEVEL = "CHAPERONE_LOG_LEVEL"
ENV_S3_BUCKET = "CHAPERONE_S3_BUCKET"
ENV_S3_ENDPOINT = "CHAPERONE_S3_ENDPOINT"
ENV_S3_REGION = "CHAPERONE_S3_REGION"
ENV_S3_PREFIX = "CHAPERONE_S3_PREFIX"
ENV_REDIS_URL = "CHAPERONE_REDIS_URL"
# The Redis password and (rediss://) CA: secretKeyRef variables of the sidecar container only,
# from the per-namespace Secret the operator keeps (CHAPERONE_REDIS_SECRET); agents never get them.
ENV_REDIS_PASSWORD = "CHAPERONE_REDIS_PASSWORD"
ENV_REDIS_CA_CERT = "CHAPERONE_REDIS_CA_CERT"
REDIS_PASSWORD_KEY = "password"   # keys of that Secret
REDIS_CA_KEY = "ca.crt"
ENV_SIDECAR_SECRET_DIR = "CHAPERONE_SIDECAR_SECRET_DIR"
# On-behalf-of tokens (X-Chaperone-On-Behalf-Of) are verified against this OIDC issuer; written
# only when CHAPERONE_OIDC_ISSUER is configured (without it the sidecar refuses such tokens).
ENV_OIDC_ISSUER = "CHAPERONE_OIDC_ISSUER"
ENV_OIDC_AUDIENCE = "CHAPERONE_OIDC_AUDIENCE"
ENV_OIDC_USERNAME_CLAIM = "CHAPERONE_OIDC_USERNAME_CLAIM"
ENV_OIDC_GROUPS_CLAIM = "CHAPERONE_OIDC_GROUPS_CLAIM"
ENV_OIDC_CA_FILE = "CHAPERONE_OIDC_CA_FILE"       # a path inside the sidecar container
ENV_OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"   # standard OpenTelemetry variable
ENV_OTEL_SERVICE = "OTEL_SERVICE_NAME"
OTEL_SERVICE_NAME = "chaperone-sidecar"
# OCSF export of the recorded flows (recording/ocsf_export.py, docs/telemetry.md); each set only
# when configured: a JSONL file path, a key prefix in the recording bucket, an OTLP/HTTP logs URL.
# Opt-in prompt/completion content (masked) on GenAI spans: OpenTelemetry's own variable.
ENV_GENAI_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENV_OCSF_FILE = "CHAPERONE_OCSF_FILE"
ENV_OCSF_S3_PREFIX = "CHAPERONE_OCSF_S3_PREFIX"
ENV_OCSF_OTLP_ENDPOINT = "CHAPERONE_OCSF_OTLP_ENDPOINT"

ENV_HOME = "HOME"
# Set by the kubelet in every container (not by the webhook): where the API server is.
ENV_KUBE_HOST = "KUBERNETES_SERVICE_HOST"
ENV_KUBE_PORT = "KUBERNETES_SERVICE_PORT"

# --- defaults (the operator's settings and the sidecar's config start from the same values) ----
DEFAULT_APPROVAL_MODE = "hold"
DEFAULT_APPROVAL_TIMEOUT_SECONDS = 300
DEFAULT_OPERATOR_NAMESPACE = "chaperone-system"
DEFAULT_OIDC_USERNAME_CLAIM = "sub"
DEFAULT_OIDC_GROUPS_CLAIM = "groups"

# --- sidecar command line and HTTP endpoints -------------------------------------------------
# args: sidecar --mode MODE --port PROXY_PORT --health-port HEALTH_PORT
DEFAULT_PROXY_PORT = 15001
DEFAULT_HEALTH_PORT = 15021
READY_PATH = "/ready"   # on the health port: 200 once every proxy listener accepts connections
