"""The model registry: one JSON manifest per model, shipped as package data (read via importlib.resources)."""
