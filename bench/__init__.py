"""The migration benchmark of issue 4: pycriu's flows against the same flows scripted with the
``criu`` command line, on loopback and on a rate-limited link between two network namespaces.

Run it with ``python -m bench`` (``make bench BENCH_ARGS=...``); docs/benchmarks.rst tells how to
read its table and plot. Modules: :mod:`bench.heartbeat` (the compiled workload and its beats),
:mod:`bench.netns` (the two "hosts"), :mod:`bench.flows` (the documented CLI flows),
:mod:`bench.pycriu_flows` (the same flows through ``pycriu.Migration``), :mod:`bench.reference`
(link throughput), :mod:`bench.runner` (trials), :mod:`bench.report` (medians, targets, output).
"""
