"""Benchmarks for asyncload: a latency-injecting HTTP server and side-by-side loader runs."""
