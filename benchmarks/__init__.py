"""graphc's benchmark suite: workloads W1-W6 (../shared/WORKLOADS.md) on graphc's backends side by
side with NumPy by hand and whichever peers are installed. Run `python -m benchmarks --help`."""
