"""Benchmarks that print tables (loader, strategies); never timed tests."""
