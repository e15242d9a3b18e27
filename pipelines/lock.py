"""One job per output: a lease file that a second job on the same output is refused by.

``OUTPUT/_lock.json`` holds the owner's host, pid, start time and a refresh time that a
background thread renews every ``REFRESH_S``. A lease is stale when its owner is gone: the pid
no longer runs on this host, or (another host) the lease was not refreshed for ``STALE_S``. A
stale lease is taken over with a message; a live one is refused with a ConfigError naming its
owner. Taking over checks the lease again after writing it, so two jobs starting at once cannot
both win (on stores without atomic create, one of them sees the other's token and stops).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

import fsspec

from hyperhuman.config import ConfigError
from shards.commit import join, write_json_atomic

LOCK_NAME = "_lock.json"
REFRESH_S = 10.0
STALE_S = 120.0


class OutputLocked(ConfigError):
    """Another live job writes this output."""


class OutputLock:
    """``with OutputLock(output, storage_options): ...`` holds the output for the block."""

    def __init__(self, output: str, storage_options: dict | None = None):
        self.output = output
        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.path = join(self.root, LOCK_NAME)
        self.lease = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> OutputLock:
        self.fs.makedirs(self.root, exist_ok=True)
        current = self._read()
        if current is not None:
            if _alive(current):
                raise OutputLocked(
                    f"{self.output} is being written by another job (host {current.get('host')}, pid "
                    f"{current.get('pid')}, started {_when(current.get('started'))}, lease refreshed "
                    f"{time.time() - float(current.get('refreshed', 0)):.0f} s ago); wait for it to finish or "
                    f"use another output. If that job is gone, remove {self.path}"
                )
            print(
                f"[annotate] taking over the stale lock of {self.output} (host {current.get('host')}, pid "
                f"{current.get('pid')}, started {_when(current.get('started'))}: that job is gone)",
                file=sys.stderr,
            )
        self._write()
        time.sleep(0.05)  # let a racing job's write land, then see whose lease stands
        winner = self._read()
        if winner is None or winner.get("token") != self.lease["token"]:
            raise OutputLocked(f"{self.output} was locked by another job starting at the same time; try again")
        self._thread = threading.Thread(target=self._refresh, name="output-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.get("token") == self.lease["token"]:
            self.fs.rm(self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            current = self._read()
            if current is None or current.get("token") != self.lease["token"]:
                return  # taken over by someone who judged us gone: do not fight over it
            self._write()

    def _write(self) -> None:
        write_json_atomic(self.fs, self.path, {**self.lease, "refreshed": time.time()})

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "r") as handle:
                lease = json.load(handle)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return lease if isinstance(lease, dict) else None


def _alive(lease: dict) -> bool:
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError):
            return True  # a process we may not signal exists
        return True
    return time.time() - float(lease.get("refreshed", 0)) < STALE_S


def _when(timestamp) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(timestamp)))
    except (TypeError, ValueError):
        return "at an unknown time"
