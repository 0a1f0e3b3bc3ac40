"""PostgreSQL connections: the sidecar terminates the agent's database connection.

One concern per module: :mod:`.protocol` (the v3 wire format), :mod:`.upstream` (TLS, login
with the held password, cancel keys), :mod:`.tls` (TLS towards the agent), :mod:`.session`
(the judged relay), :mod:`.decide` (policy and approvals per statement), :mod:`.results`
(row masking), :mod:`.record` (recording events), :mod:`.server` (listeners per connection).
Statement classification is the policy engine's (``policy/classify/postgres.py``).
docs/postgres.md is the user's view.
"""
