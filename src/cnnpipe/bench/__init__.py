"""Benchmarks, each side by side with its baseline in one run (`cnnpipe bench ...`)."""
