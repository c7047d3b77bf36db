"""Model backends: turn padded token arrays into sentence vectors. No gRPC, no batching."""

from .base import BackendKind, BackendUnavailable, Choice, Device, Encoder, EncoderInfo, Precision

__all__ = ["BackendKind", "BackendUnavailable", "Choice", "Device", "Encoder", "EncoderInfo", "Precision"]
