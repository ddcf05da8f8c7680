"""Exceptions of the host optimizer, below agent.errors.EdgeforgeError.

    EdgeforgeError                      (agent/errors.py)
    +-- ConfigError                     (agent/errors.py) config file, key or override
    +-- DataError                       dataset missing, undownloadable, corrupt, bad checksum
    +-- CheckpointError                 .pth/.pt missing, corrupt, truncated, or does not fit
    +-- PruningError                    structured pruning cannot trace the model or reach
                                        its target
    +-- QuantizationError               calibration saw no data, or no mode could be built
    +-- ExportError                     the model cannot be scripted or traced
    +-- VerificationError               the exported file disagrees with the in-memory model
"""

from __future__ import annotations

from agent.errors import EdgeforgeError


class DataError(EdgeforgeError):
    """The dataset is missing, cannot be downloaded, or is corrupt."""


class CheckpointError(EdgeforgeError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


class PruningError(EdgeforgeError):
    """Structured pruning cannot trace the model, or cannot reach its target."""


class QuantizationError(EdgeforgeError):
    """Quantization could not be carried out as configured."""


class ExportError(EdgeforgeError):
    """The model could not be turned into TorchScript."""


class VerificationError(EdgeforgeError):
    """A reloaded export does not reproduce the in-memory model: the export failed."""

    exit_code = 1
