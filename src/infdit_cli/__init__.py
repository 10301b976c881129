"""infdit: Inf-DiT image upscaling, exact to the published model and frugal with memory."""

from .config import InfDiTConfig, ModelConfig
from .model import InfDiT
from .pipeline import UpscaleOptions, upscale
from .upscaler import Upscaler, UpscaleResult
from .weights import load_model

__version__ = "0.1.0"
__all__ = ["InfDiT", "InfDiTConfig", "ModelConfig", "UpscaleOptions", "Upscaler", "UpscaleResult", "load_model",
           "upscale"]
