"""`python -m bpfprof`: the same entry point as the `bpfprof` console script."""

from bpfprof.collector.cli import main

main()
