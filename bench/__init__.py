"""Benchmarks: each prints one JSON object; ratios against a baseline measured side by side."""
