"""Benchmarks of fleet-pipeline, each reported as a ratio against a baseline
measured in the same run (the machines are shared and noisy)."""
