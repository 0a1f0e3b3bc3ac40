# Chaperone developer entry points. The README names two: `make demo` and `make test`.
# Everything they need is installed here (Debian packages, a Python venv, a control plane built
# from Go modules), so a clean clone on a fresh machine works with nothing done by hand.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
APT_PACKAGES := redis-server iproute2 iptables curl squid-openssl wrk \
                containerd runc containernetworking-plugins debootstrap buildah \
                postgresql postgresql-client git libvectorscan5 gcc
export CHAPERONE_CACHE ?= $(HOME)/.cache/chaperone

.PHONY: demo test lint deps system-deps venv control-plane node-deps sync-crds check-crds bench clean

demo: venv
	$(PY) -m chaperone_sidecar.demo

test: deps lint
	KUBEBUILDER_ASSETS="$$(hack/build-control-plane.sh)" HELM_BIN="$$(hack/build-helm.sh)" $(PY) -m pytest $(PYTEST_ARGS)

# Static checks before the tests (pyproject.toml [tool.ruff], [tool.mypy]): ruff over all the
# Python in the repo's product packages, mypy over the three packages.
lint: venv
	$(VENV)/bin/ruff check operator sidecar testbed
	$(VENV)/bin/mypy

# The story on a real node alone (e2e/node, issue 14; docs/e2e.md): containerd + runc + a
# kubelet, the image built from the Dockerfile, `helm install`. Root only. `make test` runs it too.
# Hunt with new random examples: the property tests under FUZZ_SEEDS seeds (CI derandomizes
# them, tests/conftest.py). A failure prints the seed and the example; make it a regression test.
FUZZ_SEEDS ?= 1 2 3 4
.PHONY: fuzz
fuzz: venv
	@files=$$(grep -rl --include="test_*.py" "from hypothesis" tests); for seed in $(FUZZ_SEEDS); do \
	  echo "fuzz: seed $$seed"; HYPOTHESIS_PROFILE=default $(PY) -m pytest -q -p no:cacheprovider $$files --hypothesis-seed=$$seed || exit 1; done

.PHONY: test-node
test-node: deps
	KUBEBUILDER_ASSETS="$$(hack/build-control-plane.sh)" HELM_BIN="$$(hack/build-helm.sh)" \
	  CHAPERONE_NODE_ASSETS="$$(hack/build-node.sh)" $(PY) -m pytest e2e/node $(PYTEST_ARGS)

deps: system-deps venv control-plane node-deps kube-node

# Debian packages: redis-server is a real component of the test bed; iproute2/iptables serve the
# transparent-mode tests; libvectorscan5 is the Hyperscan masking scans with (policy/masking/
# libhs.py; tests/.../test_libhs.py fails without it); gcc compiles the package's C extension
# (policy/masking/_stretches.c) when the venv installs it. apt-get runs only when something is missing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

# Exact pins in constraints.txt keep the install fast (unpinned kubernetes + boto3 backtracks).
# The editable install also builds the C extension in place (pyproject.toml, ext-modules): a
# change to its source reinstalls.
$(STAMP): pyproject.toml constraints.txt sidecar/chaperone_sidecar/policy/masking/_stretches.c
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

control-plane:
	hack/build-control-plane.sh >/dev/null
	hack/build-helm.sh >/dev/null

# Node clients of the integration tests (tests/sidecar/integration/test_sdk_streams.py): the
# official Anthropic TypeScript SDK and undici (its ProxyAgent: Node 20's fetch ignores
# HTTPS_PROXY), node-postgres (pg: test_postgres.py), pinned, installed into the cache - never committed. The tests find them through
# CHAPERONE_NODE_MODULES and fail when they are missing.
NODE_DIR      := $(CHAPERONE_CACHE)/node
NODE_PACKAGES := @anthropic-ai/sdk@1.17.0 undici@7.30.3 pg@8.23.1
export CHAPERONE_NODE_MODULES ?= $(NODE_DIR)/node_modules

node-deps:
	@test "$$(cat $(NODE_DIR)/.installed 2>/dev/null)" = "$(NODE_PACKAGES)" || { \
	  mkdir -p $(NODE_DIR) && \
	  npm install --prefix $(NODE_DIR) --no-save --no-audit --no-fund --loglevel=error $(NODE_PACKAGES) && \
	  echo "$(NODE_PACKAGES)" > $(NODE_DIR)/.installed; }

# The test bed's node (testbed/chaperone_testbed/node.py): kubelet, kube-scheduler,
# kube-controller-manager, kube-proxy and the pause image, built from Go modules and cached.
.PHONY: kube-node
kube-node:
	hack/build-node.sh >/dev/null

# The CRDs have one source (crds/). The chart carries a byte copy in files/crds/, which
# templates/crds.yaml renders (so `helm upgrade` upgrades them), and so does the sidecar package
# (chaperone_sidecar/crds/: the policy compiler validates against them without an apiserver;
# the wheel and the image cannot reach files outside the package). tests/crds/test_crd_schema.py
# and check-crds fail when a copy drifts.
CHART_CRDS := charts/chaperone/files/crds
PACKAGE_CRDS := sidecar/chaperone_sidecar/crds
sync-crds:
	for d in $(CHART_CRDS) $(PACKAGE_CRDS); do mkdir -p $$d && rm -f $$d/*.yaml && cp crds/*.yaml $$d/ || exit 1; done

check-crds:
	@for d in $(CHART_CRDS) $(PACKAGE_CRDS); do \
	  diff -r crds $$d || { echo "$$d drifted from crds/: run make sync-crds" >&2; exit 1; }; done

# Benchmarks: the policy engine micro-benchmark, then the proxy comparison (bench-proxy).
bench: deps
	$(PY) bench/bench_policy.py
	$(MAKE) bench-proxy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# The quick-start story on a kind cluster (kind-config.yaml): builds the image, loads it into
# kind, installs the chart and runs the story with kubectl. Needs Docker, kind and kubectl;
# cannot run on machines without a Docker engine (such as CI here). See docs/kind.md.
.PHONY: e2e-kind
e2e-kind: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" hack/e2e-kind.sh

# Proxy benchmarks (issue 7, bench/run.py): Chaperone against direct, bare mitmproxy and Squid
# ssl-bump, plus approval and webhook latencies on the test bed's apiserver; writes
# docs/benchmarks.md. Needs squid-openssl and wrk (Debian, in APT_PACKAGES) and uvloop/py-spy (the
# test extra). BENCH_ARGS=--quick for a
# short run.
.PHONY: bench-proxy
bench-proxy: deps
	KUBEBUILDER_ASSETS="$$(hack/build-control-plane.sh)" $(PY) bench/run.py $(BENCH_ARGS)
