"""Benchmarks of hooktrain against plain PyTorch loops (docs/benchmarks.md)."""
