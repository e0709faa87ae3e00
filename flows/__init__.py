"""Prefect flows (train, ...) and the `dashrl` command line."""
