"""Benchmarks that print figures (`python -m bench.<name>`); nothing here is deployed."""
