"""Model backends: turn padded token arrays into sentence vectors. No gRPC, no batching."""
from .base import Encoder, EncoderInfo

__all__ = ["Encoder", "EncoderInfo"]
