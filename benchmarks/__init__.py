"""tsparse benchmarks: `python -m benchmarks.report` prints the table (see README)."""
