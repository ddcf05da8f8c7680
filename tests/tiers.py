"""The test tiers, kept true by hooks (loaded from tests/conftest.py, or with `-p tests.tiers`).

    unit     in-process: no broker, no subprocess, no network, no training; the whole tier
             runs in a minute or two (`pytest -m unit`)
    broker   talks to a real mosquitto the test starts, in-process otherwise
    e2e      runs the CLIs as subprocesses, builds bundles, trains

Every test carries exactly one tier marker (the heaviest thing it does), or the run stops at
collection with the list of those that do not. A `unit` test that starts a process or opens
a network connection fails, naming what it did. The emulated boards' proof (tests.prove_arm)
is the fourth tier, `arm`: a script of its own, never collected by pytest.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

TIERS = ("unit", "broker", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop the run when a test has no tier marker, or more than one."""
    def tiers(item: pytest.Item) -> list[str]:
        return [t for t in TIERS if item.get_closest_marker(t) is not None]

    wrong = [f"{item.nodeid} ({', '.join(tiers(item)) or 'none'})" for item in items
             if len(tiers(item)) != 1]
    if wrong:
        listed = "\n  ".join(wrong[:20]) + (f"\n  ... and {len(wrong) - 20} more"
                                            if len(wrong) > 20 else "")
        raise pytest.UsageError(f"{len(wrong)} test(s) without exactly one tier marker "
                                f"({', '.join(TIERS)}; tests/tiers.py says which fits):\n  "
                                f"{listed}")


@pytest.fixture(autouse=True)
def unit_stays_in_process(request: pytest.FixtureRequest,
                          monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In a `unit` test, starting a process or connecting a socket (from any thread) fails
    the test, naming what it did."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    done: list[str] = []

    def no_process(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        done.append(f"started a process ({args!r:.80})")
        raise AssertionError(f"a unit test started a process ({args!r:.80}): mark it e2e")

    real_connect = socket.socket.connect

    def no_network(self: socket.socket, address: Any) -> Any:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        done.append(f"connected to {address!r}")
        self.close()
        raise ConnectionRefusedError(f"a unit test connected to {address!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    yield
    assert not done, f"a unit test {done[0]}: mark it broker or e2e"
