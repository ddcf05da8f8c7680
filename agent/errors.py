"""Exceptions shared by every edgeforge command.

    EdgeforgeError            base: a CLI prints "<ClassName>: <message>" and exits `exit_code`
    +-- ConfigError           a config file, key or --set override is wrong
    +-- BundleError           a model bundle is missing, tampered with or unusable here

The optimizer adds its own subclasses of EdgeforgeError in `optimizer/errors.py`.
"""

from __future__ import annotations


class EdgeforgeError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = 2


class ConfigError(EdgeforgeError):
    """A config file, key or override is missing or invalid."""


class BundleError(EdgeforgeError):
    """A bundle (manifest, model file, sample) is missing, mismatched or unusable."""
