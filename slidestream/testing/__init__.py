"""Helpers the tests and benchmarks share: configs for small local runs, feature bags, a real S3 server."""
