"""Inf-DiT training recipe: data degradation, crops, EDM sigma sampling and loss (issue 34)."""
