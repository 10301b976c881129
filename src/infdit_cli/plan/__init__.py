"""Arithmetic before any tensor exists: the block grid, memory and time predictions, calibration."""
