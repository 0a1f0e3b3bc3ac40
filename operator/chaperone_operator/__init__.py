"""Chaperone operator: kopf handlers, admission webhooks and the interception CA.

May import ``chaperone_sidecar`` (the policy compiler); never the other way round.
"""
