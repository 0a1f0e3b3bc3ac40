# syntax=docker/dockerfile:1
# The Chaperone image: one image, three roles, chosen by the arguments of `chaperone`:
#   chaperone operator ...   the operator Deployment (charts/chaperone/templates/operator.yaml)
#   chaperone sidecar ...    the injected native sidecar `chaperone-sidecar` (docs/injection.md §5)
#   /bin/sh -c <iptables>    the transparent-mode init container `chaperone-init` (root,
#                            NET_ADMIN + NET_RAW; the webhook overrides the command)
# Build: docker build -t ghcr.io/chaperone-dev/chaperone:0.1.0 .   (make e2e-kind does this)
# Static checks of this file: tests/test_dockerfile.py (no Docker engine in CI).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- build stage
# A virtualenv in /opt/chaperone, copied whole into the runtime stage (same base image, so the
# venv's interpreter symlink stays valid). Exact pins from constraints.txt, as `make venv` uses.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# gcc for the package's one C extension (chaperone_sidecar/policy/masking/_stretches.c); only
# its shared object reaches the runtime stage, inside the venv.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/chaperone
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator/ operator/
COPY sidecar/ sidecar/
# Not editable, not the test extra: the operator and sidecar packages, their entry points
# (`chaperone`, `kubectl-chaperone`, the `chaperone.commands` group) and pinned dependencies.
RUN /opt/chaperone/bin/pip install -c constraints.txt . \
 && /opt/chaperone/bin/chaperone --help >/dev/null

# ---------------------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="chaperone" \
      org.opencontainers.image.description="Kubernetes-native access gateway for AI coding agents" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/chaperone-dev/chaperone"

# iptables (+ ip6tables) for the transparent-mode init container, which runs this image.
# libvectorscan5: the system Hyperscan masking scans with (policy/masking/libhs.py; a fat-runtime
# build, 1.3-2.1x faster than the hyperscan wheel's generic one, which stays the fallback).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables libvectorscan5 \
 && rm -rf /var/lib/apt/lists/*

# The sidecar's dedicated user. The UID/GID must equal the injection default
# (InjectionSettings.sidecar_uid/gid, chart values sidecar.uid/gid): transparent mode's
# iptables rules exempt exactly that UID from redirection. The operator Deployment overrides
# the user (runAsUser 65532); the image itself never runs as root.
ARG CHAPERONE_UID=1337
ARG CHAPERONE_GID=1337
RUN groupadd --system --gid ${CHAPERONE_GID} chaperone \
 && useradd --system --uid ${CHAPERONE_UID} --gid ${CHAPERONE_GID} --home-dir /tmp \
      --no-create-home --shell /usr/sbin/nologin chaperone

COPY --from=build /opt/chaperone /opt/chaperone

# Mount points the chart and the injection webhook use (contract: docs/injection.md §7 and
# operator/chaperone_operator/injection/contract.py). The kubelet creates missing mount points
# anyway; creating them here documents the layout and gives the spool its owner for runtimes
# that copy image ownership into emptyDirs.
RUN mkdir -p /etc/chaperone/ca /etc/chaperone/podinfo /etc/chaperone/upstream-ca \
      /etc/chaperone/webhook /var/lib/chaperone/spool \
      /var/run/secrets/chaperone/connections /var/run/secrets/chaperone/webidentity \
      /var/run/secrets/chaperone/sidecar \
 && chown ${CHAPERONE_UID}:${CHAPERONE_GID} /var/lib/chaperone/spool

# HOME=/tmp: the root filesystem is read-only in pods and /tmp is an emptyDir there.
ENV PATH=/opt/chaperone/bin:${PATH} \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER ${CHAPERONE_UID}:${CHAPERONE_GID}
WORKDIR /tmp
ENTRYPOINT ["chaperone"]
CMD ["--help"]
