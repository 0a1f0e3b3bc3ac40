"""Chaperone's benchmarks (issue 7): Chaperone against direct, bare mitmproxy and Squid ssl-bump.

``python bench/run.py [--quick] [--out docs/benchmarks.md]`` (``make bench-proxy``) is the entry
point; the modules are importable as ``bench.*`` so the smoke test in ``tests/bench`` drives the
same harness with tiny counts. ``bench/bench_policy.py`` is the separate policy-engine
micro-benchmark (``make bench``).
"""
