"""Graders: math answers and sandboxed code tests."""
