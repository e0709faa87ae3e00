"""Prefect tasks: thin wrappers around dash_core phases (names, retries, tags). No algorithm lives here."""
