"""Policy engine: classify a request into a typed action, evaluate compiled AccessPolicies, mask.

Pure Python, no network and no Kubernetes: the sidecar calls it on every flow and the operator
calls its compiler at admission. Every entry point is total: bad input yields errors, never
exceptions.
"""
