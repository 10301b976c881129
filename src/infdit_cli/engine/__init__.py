"""Denoiser calls in bounded memory: the UniBA block engine, its storage, bands across ranks, the sampler."""
