"""The masking engine as it was before issue 16 (one regex/find pass per detector): a test
oracle only.

``detectors.py``, ``spans.py``, ``decoded.py`` and ``stream.py`` are the product modules of
``chaperone_sidecar/policy/masking`` at the commit before the one-pass engine, unchanged but
for ``stream.py`` importing the (unchanged) product ``encoding`` module and carrying two
behaviour fixes made later to both engines (session 6: a label before a held word is held, a
base64 run followed by a lone backslash is held), so the oracle compares engines, not bugs. The differential
test (``test_differential.py``) masks generated corpora with both engines and requires
identical output; ``bench/bench_masking.py`` times both in one alternating run. Nothing in
the product imports this package.
"""
