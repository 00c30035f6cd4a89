"""flaxflux: 1.58-bit FLUX in JAX (Flax NNX model, ternary packed weights, Pallas kernels)."""

from .config import FLUX_DEV, FLUX_SCHNELL, FluxConfig
from .loading import load_transformer
from .pipeline import FluxPipeline
from .transformer import FluxTransformer

__all__ = ["FLUX_DEV", "FLUX_SCHNELL", "FluxConfig", "FluxPipeline", "FluxTransformer", "load_transformer"]
__version__ = "0.1.0"
