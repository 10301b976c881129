"""Weights files: the safetensors format, conversion, the registry, downloads and the cache."""
