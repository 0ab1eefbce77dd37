"""Frozen copies of rclib modules before issue 15, for the benchmarks only."""
