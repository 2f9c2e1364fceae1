"""Errors raised by omg for bad input. Each message names what was wrong and what was expected.

Every one is an OmgError, itself a ValueError, so `except ValueError` still catches them all:

    OmgError
      CheckpointError    a checkpoint file is unreadable, of another architecture, or has missing/mis-shaped keys
      LoraError          a LoRA file does not fit the model it is applied to
      SamplingError      sampling cannot run or stopped: bad arguments, or a non-finite latent
        OptionError      an option of generate/sample (omg.OMGOptions) is out of range or unknown
        ScheduleError    stage 2 was driven over another sampler or sigma schedule than stage 1's
        SpecError        a spec file (YAML/JSON, or an image's recorded run) with a bad key, type or syntax
      MaskError          a class noun, user mask, box or heat map that the concept masks cannot use
      ModelError         a model component or attention layer that is missing or does not fit
      OutputError        an output path that cannot be written, or of a format omg does not write
"""


class OmgError(ValueError):
    """Base class for omg's input errors."""


class CheckpointError(OmgError):
    """A checkpoint file is unreadable, of another architecture, or has missing/mis-shaped keys."""


class LoraError(OmgError):
    """A LoRA file does not fit the model it is applied to."""


class SamplingError(OmgError):
    """Sampling stopped: bad arguments, or a non-finite latent."""


class OptionError(SamplingError):
    """An option of omg.generate / omg.sample is out of range, of the wrong type, or unknown."""


class ScheduleError(SamplingError):
    """Stage 2 was driven over another sampler, sigma schedule or starting latent than stage 1 recorded."""


class SpecError(OptionError):
    """A spec file is unreadable, or one of its keys is unknown or holds a value of the wrong type."""


class MaskError(OmgError):
    """A class noun, user mask, box or heat map that the concept masks cannot be made from."""


class ModelError(OmgError):
    """A model bundle lacks a component, or a config or attention layer does not exist or fit."""


class OutputError(OmgError):
    """An output path that cannot be written (no folder, not writable, a folder itself) or of an unknown format."""


class UnknownLayerError(ModelError, KeyError):
    """No attention layer at a given path (also a KeyError: a lookup that failed)."""

    __str__ = Exception.__str__  # KeyError's would quote the message
