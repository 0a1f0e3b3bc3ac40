#!/usr/bin/env bash
# `make e2e-kind`: the quick-start story on a real kind cluster, for users with Docker.
#
#   1. build the chaperone image and load it into a kind cluster (kind-config.yaml);
#   2. install the Helm chart (CRDs, operator, webhooks) with that image;
#   3. run an in-cluster AWS test server (moto, the version pinned in constraints.txt);
#   4. create a namespace, a Secret with (test) AWS credentials, an aws ClaudeConnection pointing
#      at the test server, and an AccessPolicy: block s3:DeleteBucket, mask SecretString, require
#      approval by group platform-approvers for iam:CreateRole, allow the rest;
#   5. start a labelled agent pod running real AWS CLI commands through the injected sidecar;
#   6. show `kubectl get ar`, approve as alice (platform-approvers, by impersonation) with
#      `kubectl chaperone approve`, and check what the agent saw.
#
# Cannot run on machines without a Docker engine (such as this project's CI): it says so and
# exits 2. docs/kind.md describes it. Environment:
#   KIND_CLUSTER     kind cluster name (default chaperone; reused when it exists)
#   CHAPERONE_IMAGE  image to build and load (default ghcr.io/chaperone-dev/chaperone:e2e)
#   E2E_NAMESPACE    namespace of the story (default agents)
#   AWS_CLI_IMAGE    the agent's image (default amazon/aws-cli:latest)
#   KEEP_CLUSTER=1   keep the cluster afterwards (default: delete it)
#   HELM             helm binary (default: helm on PATH, else hack/build-helm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-chaperone}
IMAGE=${CHAPERONE_IMAGE:-ghcr.io/chaperone-dev/chaperone:e2e}
NS=${E2E_NAMESPACE:-agents}
SYSTEM_NS=chaperone-system
AWS_NS=aws-sim
AWS_CLI_IMAGE=${AWS_CLI_IMAGE:-amazon/aws-cli:latest}

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit "${2:-1}"; }

# ---------------------------------------------------------------------------- prerequisites
command -v docker >/dev/null 2>&1 || die "docker not found: make e2e-kind needs Docker" 2
docker info >/dev/null 2>&1 || die "make e2e-kind needs a running Docker engine ('docker info' failed); it cannot run on machines without one, such as this project's CI" 2
for tool in kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (see docs/kind.md)" 2
done
command -v kubectl-chaperone >/dev/null 2>&1 \
  || die "kubectl-chaperone not on PATH: run 'make venv' and put .venv/bin on PATH (make e2e-kind does)" 2
HELM=${HELM:-$(command -v helm || true)}
[ -n "$HELM" ] || HELM=$(hack/build-helm.sh)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/chaperone-e2e-kind.XXXXXX")
export KUBECONFIG="$WORK/kubeconfig"
cleanup() {
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "kept cluster '$CLUSTER'; kubeconfig: $KUBECONFIG"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------- image and cluster
say "building $IMAGE"
docker build -t "$IMAGE" .

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "reusing kind cluster $CLUSTER"
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config kind-config.yaml --kubeconfig "$KUBECONFIG" --wait 180s
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "installing the chart"
"$HELM" upgrade --install chaperone charts/chaperone --namespace "$SYSTEM_NS" --create-namespace \
  --set operator.image.repository="${IMAGE%:*}" --set operator.image.tag="${IMAGE##*:}" \
  --set operator.image.pullPolicy=Never \
  --set sidecar.image.repository="${IMAGE%:*}" --set sidecar.image.tag="${IMAGE##*:}" \
  --set sidecar.image.pullPolicy=Never \
  --wait --timeout 5m
kubectl -n "$SYSTEM_NS" rollout status deployment/chaperone-operator --timeout=180s

# ---------------------------------------------------------------------------- AWS test server
MOTO_VERSION=$(sed -n 's/^moto==//p' constraints.txt)
say "starting the AWS test server (moto $MOTO_VERSION)"
kubectl create namespace "$AWS_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: moto, namespace: $AWS_NS}
spec:
  selector: {matchLabels: {app: moto}}
  template:
    metadata: {labels: {app: moto}}
    spec:
      containers:
        - name: moto
          image: motoserver/moto:$MOTO_VERSION
          ports: [{containerPort: 5000}]
---
apiVersion: v1
kind: Service
metadata: {name: moto, namespace: $AWS_NS}
spec:
  selector: {app: moto}
  ports: [{port: 5000, targetPort: 5000}]
EOF
kubectl -n "$AWS_NS" rollout status deployment/moto --timeout=180s

# ---------------------------------------------------------------------------- the quick start
say "namespace $NS: credentials, connection, policy"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f - <<EOF
apiVersion: v1
kind: Secret
metadata: {name: aws-credentials, namespace: $NS}
stringData:
  AWS_ACCESS_KEY_ID: AKIAE2EKINDEXAMPLE01
  AWS_SECRET_ACCESS_KEY: e2eKindSecretAccessKeyExampleExample0001
---
apiVersion: chaperone.dev/v1alpha1
kind: ClaudeConnection
metadata: {name: aws, namespace: $NS}
spec:
  type: aws
  aws:
    region: us-east-1
    endpointURL: http://moto.$AWS_NS.svc.cluster.local:5000
  credentials:
    source: secret
    secretRef: {name: aws-credentials}
---
apiVersion: chaperone.dev/v1alpha1
kind: AccessPolicy
metadata: {name: aws-guardrails, namespace: $NS}
spec:
  connections: [aws]
  defaultEffect: allow
  rules:
    - name: no-bucket-deletion
      match: {aws: {actions: ["s3:DeleteBucket"]}}
      block: {message: Bucket deletion is not allowed for agents.}
    - name: mask-secret-values
      match: {aws: {actions: ["secretsmanager:GetSecretValue"]}}
      mask: {fields: ["\$.SecretString"]}
    - name: new-roles-need-approval
      match: {aws: {actions: ["iam:CreateRole"]}}
      requireApproval:
        approvers: {groups: [platform-approvers]}
        mode: hold
        holdSeconds: 300
        timeoutSeconds: 600
EOF

say "starting the agent pod (labelled chaperone.dev/inject=true)"
kubectl -n "$NS" delete pod claude-agent --ignore-not-found --wait=true
kubectl -n "$NS" delete ar --all --ignore-not-found
kubectl -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: claude-agent
  labels: {chaperone.dev/inject: "true"}
spec:
  restartPolicy: Never
  containers:
    - name: agent
      image: $AWS_CLI_IMAGE
      env:  # dummy keys: the sidecar strips this signature and re-signs with the Secret's keys
        - {name: AWS_ACCESS_KEY_ID, value: AKIADUMMYDUMMYDUMMY0}
        - {name: AWS_SECRET_ACCESS_KEY, value: dummy-secret-the-agent-never-sees-the-real-one}
        - {name: AWS_DEFAULT_REGION, value: us-east-1}
      command: ["/bin/sh", "-c"]
      args:
        - |
          aws s3 mb s3://e2e-bucket && aws s3 ls && echo "STEP s3-ls ok"
          aws s3api delete-bucket --bucket e2e-bucket || echo "STEP delete-bucket refused"
          aws s3 ls | grep -q e2e-bucket && echo "STEP bucket still exists"
          aws secretsmanager create-secret --name db --secret-string hunter2-e2e >/dev/null
          aws secretsmanager get-secret-value --secret-id db && echo "STEP get-secret ok"
          aws iam create-role --cli-read-timeout 330 --role-name deployer \
            --assume-role-policy-document '{"Version":"2012-10-17","Statement":[]}' \
            && echo "STEP create-role ok"
EOF
kubectl -n "$NS" get pod claude-agent -o jsonpath='{.metadata.annotations.chaperone\.dev/status}'; echo

say "waiting for the ApprovalRequest"
ar=""
for _ in $(seq 1 120); do
  ar=$(kubectl -n "$NS" get ar -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
  [ -n "$ar" ] && break
  sleep 2
done
[ -n "$ar" ] || { kubectl -n "$NS" logs claude-agent --all-containers || true; die "no ApprovalRequest appeared"; }
kubectl get ar -n "$NS"
kubectl chaperone list -n "$NS"
kubectl chaperone show "$ar" -n "$NS"

say "approving $ar as alice (platform-approvers)"
kubectl chaperone approve "$ar" -n "$NS" --as alice --as-group platform-approvers --reason "e2e-kind"
kubectl get ar -n "$NS"

say "waiting for the agent to finish"
kubectl -n "$NS" wait pod/claude-agent --for=jsonpath='{.status.phase}'=Succeeded --timeout=360s \
  || { kubectl -n "$NS" logs claude-agent --all-containers || true; die "the agent pod did not succeed"; }
logs=$(kubectl -n "$NS" logs claude-agent -c agent)
printf '%s\n' "$logs"

failed=0
for step in "s3-ls ok" "delete-bucket refused" "bucket still exists" "get-secret ok" "create-role ok"; do
  if printf '%s\n' "$logs" | grep -q "STEP $step"; then echo "ok: $step"; else echo "FAILED: $step"; failed=1; fi
done
if printf '%s\n' "$logs" | grep -q hunter2-e2e; then echo "FAILED: the secret value reached the agent unmasked"; failed=1; fi
[ "$failed" = 0 ] || die "the story did not go as expected"
say "e2e-kind passed"
