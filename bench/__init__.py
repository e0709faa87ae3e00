"""Benchmarks: scripts that print tables (`dashrl bench <name>`), importable so the nightly flow (flows/nightly.py)
measures its figures with the same code. Modules named `_*` are helpers, not benchmarks."""
