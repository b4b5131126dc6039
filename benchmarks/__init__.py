"""Benchmark suite for xraytwisted (and any other X-Ray daemon).

Not part of the package and never imported by the test suite.  Entry points:

* ``python -m benchmarks.run``      rate sweep (CPU, loss, RSS, latency), soak mode
* ``python -m benchmarks.lone``     lone-segment latency check
* ``python -m benchmarks.sinkload`` proves the sink is not the bottleneck
* ``python -m benchmarks.profile``  py-spy profile of the daemon under load

See docs/benchmarks.md.
"""
