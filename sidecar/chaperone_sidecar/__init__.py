"""Chaperone sidecar: the mitmproxy-based checkpoint on every agent pod's data path.

Holds the policy engine (classify, compile, evaluate, mask), which the operator also imports to
validate policies at admission. This package never imports ``chaperone_operator``.
"""
