"""Exceptions of the operator's tools, below agent.errors.EdgeforgeError.

    EdgeforgeError                      (agent/errors.py) exit 2
    +-- ConfigError                     (agent/errors.py) config file, key or override
    +-- BundleError                     (agent/errors.py) a bundle missing or tampered with
    +-- DeployError                     edge-deploy / edge-monitor failed
        +-- UsageError                  a target, path or argument is wrong (exit 2)
        +-- FleetError                  a board unreachable, failing or silent (exit 1)

`edge-deploy` and `edge-monitor` catch EdgeforgeError once in `main()`, print
"<ClassName>: <message>" and exit with the class's `exit_code`.
"""

from __future__ import annotations

from agent.errors import EdgeforgeError


class DeployError(EdgeforgeError):
    """An operator command could not do what was asked."""


class UsageError(DeployError):
    """A command-line argument names something that is not there or not of its form."""

    exit_code = 2


class FleetError(DeployError):
    """A board cannot be reached, refused a step, or did not report back."""

    exit_code = 1
