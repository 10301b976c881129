"""The network: configuration, layers, attention, the CLIP encoder and the Inf-DiT module."""
