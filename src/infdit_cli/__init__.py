"""infdit: Inf-DiT image upscaling, exact to the published model and frugal with memory."""

from .config import InfDiTConfig, ModelConfig
from .engine import BlockEngine, denoise
from .model import InfDiT
from .pipeline import UpscaleOptions, upscale
from .upscaler import Upscaler, UpscaleResult
from .weights import load_model

__version__ = "0.1.0"
__all__ = ["BlockEngine", "InfDiT", "InfDiTConfig", "ModelConfig", "UpscaleOptions", "Upscaler", "UpscaleResult",
           "denoise", "load_model", "upscale"]
