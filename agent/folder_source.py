"""`source.kind: folder`: classify each new JPEG or PNG dropped into a directory, once.

A file is taken when it is complete: at once when inotify reports it closed after writing or
renamed into the folder (through the `watchdog` library, where it is installed and inotify
works), else once its size and mtime have not changed for `source.settle_s` (a writer that
pauses mid-file is waited for). Hidden files, other extensions and anything that is not a
regular file (a FIFO, a device, a symlink) are left alone, so a writer can use
`.name.jpg.tmp` and rename.

The file's bytes go to the loop whole; the file itself is handled only after its result is
in the spool (`Frame.done`): moved to `done_dir`, deleted or kept, as `source.after` says.
The result carries a marker of the file (name, size, mtime) that the spool stores in the
result's own transaction; a file found again after a crash between the two (a kill -9, a
power cut) whose marker is stored is handled without a second result, so every file gets
exactly one.

An image that cannot be used is tried again while it is younger than `settle_s` (it may
still be being written), then moved to `failed_dir` with `<name>.reason.txt` beside it
saying why, one log line, and counted. It is never retried, so no file can make the agent
loop or restart. A result the spool cannot store (disk full) leaves the file in place, to be
taken again after `settle_s`.
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
from agent.untrusted import Untrusted, read_regular

log = logging.getLogger(__name__)

SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderSource(SourceThread):
    """Watches source.path; see the module docstring."""

    def __init__(self, cfg: Any, frames: FrameQueue,
                 answered: frozenset[str] = frozenset()) -> None:
        """`answered`: the markers (`marker`) of files whose result is already spooled."""
        super().__init__("source-folder", cfg, frames)
        self.folder = Path(cfg.path)
        self.done_dir = Path(cfg.done_dir) if cfg.done_dir else self.folder / "done"
        self.failed_dir = Path(cfg.failed_dir) if cfg.failed_dir else self.folder / "failed"
        self._lock = threading.Lock()  # in_flight and handled: the loop and publisher finish
        self._in_flight: set[str] = set()
        self._handled: set[tuple[str, int, int]] = set()  # after=keep: (name, size, mtime)
        # name -> (size, mtime) at the last scan, and since when (monotonic) it is so
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}
        self._closed: set[str] = set()  # names inotify saw complete
        # failed while young, or not spooled: (size, mtime) then, and not before (monotonic)
        self._retry: dict[str, tuple[tuple[int, int], float]] = {}
        self._answered = set(answered)
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
        if self.stopping.is_set():  # stopped while the folder was still missing
            return
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
        seen: dict[str, tuple[tuple[int, int], float]] = {}
        now, wall = time.monotonic(), time.time()
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
            before = self._seen.get(name)
            since = before[1] if before is not None and before[0] == key else now
            seen[name] = (key, since)
            with self._lock:
                busy = name in self._in_flight or (name, *key) in self._handled
                closed = name in self._closed
                retry = self._retry.get(name)
            if busy:
                continue
            # Unchanged for settle_s: by the file's own mtime, or by what the scans saw (an
            # mtime in the future, from a wrong clock or a copy, would otherwise never do).
            settled = (wall - st.st_mtime >= self.cfg.settle_s
                       or now - since >= self.cfg.settle_s)
            if retry is not None and (now < retry[1] or (retry[0] == key and not settled)):
                continue  # failed while young and unchanged since: wait for it to settle
            if not (closed or settled):
                continue  # still being written, as far as anyone can tell
            if marker(name, key) in self._answered:
                self._answered.discard(marker(name, key))
                if self.cfg.after != "keep":  # kept files are found again at every start
                    log.info("folder source: %s already has its result (the last run stopped "
                             "before handling the file); not classified again", name)
                with self._lock:
                    self._in_flight.add(name)
                self.finish(name, True, "")
                continue
            if not self._take(Path(entry.path), key):
                return  # stopping
        self._seen = seen

    def _take(self, path: Path, key: tuple[int, int]) -> bool:
        """Read `path` and hand it to the loop (waiting for room); False when stopping."""
        name = path.name
        with self._lock:
            self._closed.discard(name)
            self._in_flight.add(name)
        limit = int(self.cfg.max_image_mb * 1e6)
        captured, ts = now_pair()
        data, error = None, None
        if key[0] > limit:
            error = (f"{key[0]:,} bytes is more than source.max_image_mb "
                     f"({self.cfg.max_image_mb:g} MB)")
        else:
            try:
                data = read_regular(path, limit, "source.max_image_mb")
            except Untrusted as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot read it ({exc.strerror})"
        frame = Frame(name, captured, ts, time.perf_counter() - captured, data=data,
                      error=error, done=lambda ok, why: self.finish(name, ok, why),
                      marker=marker(name, key))
        while not self.frames.put(frame, timeout_s=0.5):
            if self.stopping.is_set():
                with self._lock:
                    self._in_flight.discard(name)
                return False
        return True

    # --- after the result (the loop's or the publisher's thread) ---------------------------

    def finish(self, name: str, ok: bool | None, why: str) -> None:
        """The file's result is durable (ok), it is not a usable image (False), or its
        result could not be stored (None: taken again later): handle the file."""
        path = self.folder / name
        try:
            if ok is None:
                st = path.stat()
                with self._lock:
                    self._retry[name] = ((st.st_size, st.st_mtime_ns),
                                         time.monotonic() + self.cfg.settle_s)
            elif not ok:
                st = path.stat()
                key = (st.st_size, st.st_mtime_ns)
                with self._lock:
                    again = self._retry.get(name, (None, 0.0))[0] == key
                if not again and time.time() - st.st_mtime < self.cfg.settle_s:
                    # Perhaps still being written: once more when it changes or settles.
                    with self._lock:
                        self._retry[name] = (key, 0.0)
                    log.info("folder source: %s is not usable yet (%s); trying again when it "
                             "changes or has not changed for %g s", name, why,
                             self.cfg.settle_s)
                    return
                self.failed += 1
                target = _free_name(self.failed_dir / name)
                os.replace(path, target)
                with self._lock:
                    self._retry.pop(name, None)
                log.warning("folder source: %s is not a usable image (%s); moved to %s", name,
                            why or "unreadable", target)
                _write_reason(target, why or "unreadable")
            elif self.cfg.after == "move":
                os.replace(path, _free_name(self.done_dir / name))
            elif self.cfg.after == "delete":
                path.unlink()
            else:
                st = path.stat()
                with self._lock:
                    self._handled.add((name, st.st_size, st.st_mtime_ns))
            if ok:
                with self._lock:
                    self._retry.pop(name, None)
        except OSError as exc:
            log.warning("folder source: cannot %s %s (%s)", "move aside" if not ok else
                        self.cfg.after, path, exc.strerror)
            try:  # not taken again in this run, whatever it is
                st = path.stat()
                with self._lock:
                    self._handled.add((name, st.st_size, st.st_mtime_ns))
            except OSError:
                pass
        finally:
            with self._lock:
                self._in_flight.discard(name)


def marker(name: str, key: tuple[int, int]) -> str:
    """The spool's marker of a watched file: its name, size and mtime."""
    return f"file:{name}:{key[0]}:{key[1]}"


def _write_reason(target: Path, why: str) -> None:
    """`<target>.reason.txt`: why the file was moved aside, for whoever looks in failed/."""
    try:
        target.with_name(target.name + ".reason.txt").write_text(
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {why}\n", encoding="utf-8")
    except OSError as exc:
        log.warning("folder source: cannot write the reason beside %s (%s)", target,
                    exc.strerror)


def _free_name(target: Path) -> Path:
    """`target`, or `stem-2.ext`, `stem-3.ext`, ... if it exists: nothing is overwritten."""
    n = 2
    candidate = target
    while candidate.exists():
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    return candidate
