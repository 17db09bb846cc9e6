"""Benchmarks: `make bench` runs them all and writes their tables under bench-out/ (copied to docs/benchmarks.md)."""
