"""Errors raised by omg. Each message names the file, the key and what was expected."""


class OmgError(ValueError):
    """Base class for omg's input errors."""


class CheckpointError(OmgError):
    """A checkpoint file is unreadable, of another architecture, or has missing/mis-shaped keys."""


class LoraError(OmgError):
    """A LoRA file does not fit the model it is applied to."""


class SamplingError(OmgError):
    """Sampling stopped: bad arguments, or a non-finite latent."""
