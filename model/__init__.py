"""The device-agnostic DeepSeek-V4 graph on the HAL.

    >>> from seahal.model import load
    >>> model = load("path/to/checkpoint", device="auto")   # every op bound once, via a plan
    >>> logits = model(input_ids)                            # [B, S, vocab]
"""

from .config import ModelConfig
from .loader import load

__all__ = ["ModelConfig", "load"]
