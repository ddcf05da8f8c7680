"""The board's versioned model store: every bundle in its own folder, `current` a symlink.

    <store>/versions/<version>-<sha12>/   manifest.json, signature.json, model, sample
    <store>/current -> versions/<id>       model.dir points here; switched with one rename
    <store>/state.json                     applied stack, highest version, pending watch

A version is staged complete (written to a hidden folder, fsynced, then renamed into
versions/), so `current` never points at a half-written bundle. `switch` replaces the
`current` link atomically (symlink + rename). The stack records the order versions went
live; `rollback` drops the newest and goes back to the one before it. Only the newest
`keep` versions of the stack stay on disk.

Stdlib only: edge-deploy flash runs parts of it on a board before anything is installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.errors import BundleError
from agent.untrusted import loads_json, read_regular

log = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"
STATE = "state.json"


def version_id(version: int, sha256: str) -> str:
    """The folder name of one release: version number and the model's short sha256."""
    return f"{version}-{sha256[:12]}"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Store:
    """One board's model store rooted at `root` (usually /var/lib/edgeforge/models)."""

    root: Path

    @classmethod
    def behind(cls, model_dir: Path) -> Store | None:
        """The store whose `current` link is `model_dir`, or None for a plain bundle folder."""
        return cls(model_dir.parent) if model_dir.name == CURRENT and model_dir.is_symlink() \
            else None

    @classmethod
    def for_model_dir(cls, model_dir: Path) -> Store:
        """The store whose `current` link is `model_dir`.

        Raises:
            BundleError: model.dir is not a store's `current` link.
        """
        store = cls.behind(model_dir)
        if store is None:
            raise BundleError(f"model.dir {model_dir} is not a versioned store's '{CURRENT}' "
                              f"link: remote updates need a board set up by edge-deploy flash "
                              f"(model.dir: <store>/{CURRENT})")
        return store

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def current(self) -> str | None:
        """The id `current` points at, or None before the first switch."""
        try:
            return Path(os.readlink(self.current_link)).name
        except (FileNotFoundError, OSError):
            return None

    def path(self, vid: str) -> Path:
        return self.root / VERSIONS / vid

    def state(self) -> dict[str, Any]:
        """state.json: {"stack": [{"id", "version", "sha256", "applied_utc", "how"}...],
        "max_version": int, "pending": id or None, "rejected": [ids]}."""
        try:
            raw = loads_json(read_regular(self.root / STATE, 16_000_000, "model store state"),
                             STATE)
            if isinstance(raw, dict):
                return raw
        except (OSError, ValueError):
            pass
        return {"stack": [], "max_version": 0, "pending": None, "rejected": []}

    def _save(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{STATE}.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / STATE)
        _fsync_dir(self.root)

    def stage(self, vid: str, files: dict[str, bytes]) -> Path:
        """Write a verified bundle as versions/<vid> (complete or not at all); idempotent.

        The caller has checked every byte already: this only stores them.
        """
        dest = self.path(vid)
        if dest.is_dir():
            return dest
        (self.root / VERSIONS).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{vid}.", dir=self.root / VERSIONS))
        try:
            for name, data in files.items():
                with (tmp / name).open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            tmp.chmod(0o755)
            os.rename(tmp, dest)
            _fsync_dir(self.root / VERSIONS)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def discard(self, vid: str) -> None:
        """Remove a staged version that never went live."""
        if vid != self.current():
            shutil.rmtree(self.path(vid), ignore_errors=True)

    def switch(self, vid: str, version: int, sha256: str, how: str,
               pending: bool = False, running: bool = False) -> None:
        """Point `current` at versions/<vid> atomically and push it on the stack.

        `pending` puts it on trial until `confirm`; `running` says an agent already runs it
        (an update applied live), so a restart before `confirm` means it failed.
        """
        if not self.path(vid).is_dir():
            raise BundleError(f"{self.path(vid)}: no such version in the store")
        self._link(vid)
        state = self.state()
        stack = [e for e in state.get("stack", []) if e.get("id") != vid]
        stack.append({"id": vid, "version": int(version), "sha256": sha256,
                      "applied_utc": now_utc(), "how": how})
        state["stack"] = stack
        state["max_version"] = max(int(state.get("max_version", 0)), int(version))
        state["pending"] = vid if pending else None
        state["trial_started"] = bool(pending and running)
        self._save(state)

    def start_trial(self) -> str | None:
        """At agent start: the version on trial if an agent already started it once (so it
        failed: roll back), else None after marking this start as its first."""
        state = self.state()
        pending = state.get("pending")
        if not pending or pending != self.current():
            return None
        if state.get("trial_started"):
            return str(pending)
        state["trial_started"] = True
        self._save(state)
        return None

    def _link(self, vid: str) -> None:
        tmp = self.root / f".{CURRENT}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(Path(VERSIONS) / vid, tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.root)

    def confirm(self, vid: str, keep: int) -> list[str]:
        """The pending version proved healthy: clear the mark, prune old versions."""
        state = self.state()
        if state.get("pending") == vid:
            state["pending"] = None
            self._save(state)
        return self.prune(keep)

    def rollback_target(self) -> dict[str, Any] | None:
        """The stack entry `rollback` would restore (the one below the current), or None."""
        current = self.current()
        stack = [e for e in self.state().get("stack", []) if self.path(e["id"]).is_dir()]
        below = [e for e in stack if e["id"] != current]
        return below[-1] if below else None

    def rollback(self, reason: str) -> tuple[str | None, dict[str, Any]]:
        """Drop the current version from the stack and point `current` at the one before.

        Returns (the id left, the restored entry). The version left stays on disk, marked
        rejected, for a person to look at, until pruned.

        Raises:
            BundleError: there is no earlier version to go back to.
        """
        target = self.rollback_target()
        if target is None:
            raise BundleError("no earlier version on this board to roll back to")
        left = self.current()
        self._link(target["id"])
        state = self.state()
        state["stack"] = [e for e in state.get("stack", []) if e["id"] != left]
        state["pending"] = None
        state["rejected"] = ([*state.get("rejected", []), {"id": left, "reason": reason,
                                                          "utc": now_utc()}])[-10:]
        self._save(state)
        return left, target

    def prune(self, keep: int) -> list[str]:
        """Delete versions beyond the newest `keep` of the stack (never the current)."""
        state = self.state()
        live = [e["id"] for e in state.get("stack", [])][-keep:]
        current = self.current()
        removed: list[str] = []
        versions = self.root / VERSIONS
        if not versions.is_dir():
            return removed
        for child in versions.iterdir():
            if child.name.startswith(".") or child.name in live or child.name == current:
                continue
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
        state["stack"] = [e for e in state.get("stack", []) if e["id"] not in removed]
        self._save(state)
        return removed

    def summary(self) -> dict[str, Any]:
        """What diagnostics and edge-deploy show: current, stack, on disk, highest version."""
        state = self.state()
        versions = self.root / VERSIONS
        on_disk = sorted(p.name for p in versions.iterdir()
                         if not p.name.startswith(".")) if versions.is_dir() else []
        return {"store": str(self.root), "current": self.current(),
                "stack": state.get("stack", []), "on_disk": on_disk,
                "max_version": state.get("max_version", 0), "pending": state.get("pending"),
                "rejected": state.get("rejected", [])}


def recover_trial(store: Store) -> str | None:
    """Roll back a version that was still on trial when the agent stopped; say why or None."""
    pending = store.start_trial()
    if pending is None:
        return None
    reason = (f"the agent restarted while version {pending} was on trial (crash, kill or "
              f"reboot): rolled back to the version before it")
    left, target = store.rollback(reason)
    log.warning("update: %s (%s -> %s)", reason, left, target["id"])
    return reason
