"""wsession benchmarks: server CPU and memory per operation against bare Starlette.

``make bench`` (``python -m bench``) prints the table; ``make bench-smoke``
(``python -m bench --smoke``) only checks that the harness works. See BENCHMARKS.md.
"""
