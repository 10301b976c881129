"""infdit: Inf-DiT image upscaling, exact to the published model and frugal with memory."""

__version__ = "0.1.0"
