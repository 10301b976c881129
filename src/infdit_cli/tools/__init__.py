"""Measurements: `infdit bench` and `infdit selftest`."""
