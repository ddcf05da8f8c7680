"""`source.kind: folder`: classify each new JPEG or PNG dropped into a directory, once.

A file is taken when it is complete: at once when inotify reports it closed after writing or
renamed into the folder (through the `watchdog` library, where it is installed and inotify
works), else when two scans `source.poll_s` apart see the same size and mtime. Hidden files
and other extensions are left alone, so a writer can use `.name.jpg.tmp` and rename.

The file's bytes go to the loop whole; the file itself is handled only after its result is
in the spool (`Frame.done`): moved to `done_dir`, deleted or kept, as `source.after` says.
An unreadable image is moved to `failed_dir` with one log line and counted. A crash between
the two leaves the file where it was, and it is classified again on the next start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import SourceError
from agent.sources import Backoff, Frame, FrameQueue, SourceThread, now_pair

log = logging.getLogger(__name__)

SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderSource(SourceThread):
    """Watches source.path; see the module docstring."""

    def __init__(self, cfg: Any, frames: FrameQueue) -> None:
        super().__init__("source-folder", cfg, frames)
        self.folder = Path(cfg.path)
        self.done_dir = Path(cfg.done_dir) if cfg.done_dir else self.folder / "done"
        self.failed_dir = Path(cfg.failed_dir) if cfg.failed_dir else self.folder / "failed"
        self._lock = threading.Lock()  # in_flight and handled: the loop and publisher finish
        self._in_flight: set[str] = set()
        self._handled: set[tuple[str, int, int]] = set()  # after=keep: (name, size, mtime)
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) at the last scan
        self._closed: set[str] = set()  # names inotify saw complete
        self._wake = threading.Event()
        self.failed = 0  # files moved aside as unreadable or too large

    # --- the thread ------------------------------------------------------------------------

    def produce(self) -> None:
        backoff = Backoff(self.cfg.reopen_max_s)
        while not self.stopping.is_set():
            try:
                self._check_folder()
            except SourceError as exc:
                self.wait_to_retry(backoff, str(exc), "looking again")
                continue
            break
        observer = self._watch()
        self.status = f"watching {self.folder} ({'inotify' if observer else 'polling'})"
        log.info("folder source: %s every %g s, then %s", self.status, self.cfg.poll_s,
                 {"move": f"move to {self.done_dir}", "delete": "delete",
                  "keep": "keep"}[self.cfg.after])
        try:
            while not self.stopping.is_set():
                self._scan()
                self._wake.wait(self.cfg.poll_s)
                self._wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(2.0)

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    def _check_folder(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder} is not a directory (create it, or set "
                              f"source.path to the folder to watch)")
        for d in (self.done_dir, self.failed_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SourceError(f"cannot create {d} ({exc.strerror})") from None

    def _watch(self) -> Any:
        """A started watchdog observer waking the scan on inotify events, or None."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers.inotify import InotifyObserver
        except ImportError:
            log.info("folder source: watchdog is not installed; polling every %g s "
                     "(pip install 'edgeforge[images]' for inotify)", self.cfg.poll_s)
            return None
        source = self

        class Wake(FileSystemEventHandler):  # type: ignore[misc]
            def on_closed(self, event: Any) -> None:
                source._complete(event.src_path)

            def on_moved(self, event: Any) -> None:
                source._complete(event.dest_path)

        try:
            observer = InotifyObserver()
            observer.schedule(Wake(), str(self.folder), recursive=False)
            observer.start()
        except OSError as exc:  # no inotify, or out of watches
            log.warning("folder source: inotify unavailable (%s); polling every %g s", exc,
                        self.cfg.poll_s)
            return None
        return observer

    def _complete(self, path: Any) -> None:
        p = Path(os.fsdecode(path))
        if p.parent == self.folder:
            with self._lock:
                self._closed.add(p.name)
            self._wake.set()

    def _scan(self) -> None:
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("folder source: cannot list %s (%s)", self.folder, exc.strerror)
            return
        seen: dict[str, tuple[int, int]] = {}
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(SUFFIXES):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone between the listing and the stat
            key = (st.st_size, st.st_mtime_ns)
            seen[name] = key
            with self._lock:
                busy = name in self._in_flight or (name, *key) in self._handled
                complete = name in self._closed
            if busy or not (complete or self._seen.get(name) == key):
                continue
            if not self._take(Path(entry.path), st.st_size):
                return  # stopping
        self._seen = seen

    def _take(self, path: Path, size: int) -> bool:
        """Read `path` and hand it to the loop (waiting for room); False when stopping."""
        name = path.name
        with self._lock:
            self._closed.discard(name)
            self._in_flight.add(name)
        limit = int(self.cfg.max_image_mb * 1e6)
        captured, ts = now_pair()
        data, error = None, None
        if size > limit:
            error = (f"{size:,} bytes is more than source.max_image_mb "
                     f"({self.cfg.max_image_mb:g} MB)")
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                error = f"cannot read it ({exc.strerror})"
        frame = Frame(name, captured, ts, time.perf_counter() - captured, data=data,
                      error=error, done=lambda ok, why: self.finish(name, ok, why))
        while not self.frames.put(frame, timeout_s=0.5):
            if self.stopping.is_set():
                with self._lock:
                    self._in_flight.discard(name)
                return False
        return True

    # --- after the result (the loop's or the publisher's thread) ---------------------------

    def finish(self, name: str, ok: bool, why: str) -> None:
        """The file's result is durable (ok) or it is not a usable image: handle the file."""
        path = self.folder / name
        try:
            if not ok:
                self.failed += 1
                target = _free_name(self.failed_dir / name)
                os.replace(path, target)
                log.warning("folder source: %s is not a usable image (%s); moved to %s", name,
                            why or "unreadable", target)
            elif self.cfg.after == "move":
                os.replace(path, _free_name(self.done_dir / name))
            elif self.cfg.after == "delete":
                path.unlink()
            else:
                st = path.stat()
                with self._lock:
                    self._handled.add((name, st.st_size, st.st_mtime_ns))
        except OSError as exc:
            log.warning("folder source: cannot %s %s (%s)", "move aside" if not ok else
                        self.cfg.after, path, exc.strerror)
        finally:
            with self._lock:
                self._in_flight.discard(name)


def _free_name(target: Path) -> Path:
    """`target`, or `stem-2.ext`, `stem-3.ext`, ... if it exists: nothing is overwritten."""
    n = 2
    candidate = target
    while candidate.exists():
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    return candidate
