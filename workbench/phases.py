"""Which phase of a run is running (model load, training, each eval), with an ETA and the time it took.

Each phase's ETA is how long the same phase took the last time a run with the same setup (model, hook,
sizes, device) finished it on this machine; the times live in one small JSON file in the cache. The
bars inside a phase (training, sae_bench's loops) show their own rate and ETA.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path


class Phases:
    def __init__(self, names: list[str], history: Path | None, setup_key: str, enabled: bool = True, stream=None):
        self.names, self.history, self.key, self.enabled = list(names), history, setup_key, enabled
        self.stream = stream or sys.stderr
        self.took: dict[str, float] = {}
        self.started: list[str] = []  # numbered in the order they start (a warm run loads the LM after training)

    def _load(self) -> dict:
        try:
            return json.loads(self.history.read_text()) if self.history else {}
        except (OSError, ValueError):
            return {}  # a missing or torn history only costs the ETA

    def eta(self, name: str) -> float | None:
        return self._load().get(self.key, {}).get(name)

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if name not in self.names:
            self.names.append(name)
        if name not in self.started:
            self.started.append(name)
        tag = f"[{self.started.index(name) + 1}/{len(self.names)}] {name}"
        eta = self.eta(name)
        self._say(f"{tag}: started" + (f", ETA ~{eta:.0f} s (the last run with this setup)" if eta is not None else
                                       " (first run with this setup: no ETA yet)"))
        start = time.perf_counter()
        yield
        took = self.took[name] = time.perf_counter() - start
        self._say(f"{tag}: done in {took:.0f} s")
        self._record(name, took)

    def _record(self, name: str, took: float) -> None:
        if not self.history:
            return
        from workbench.runio import atomic_write_json
        data = self._load()
        data.setdefault(self.key, {})[name] = round(took, 1)
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.history, data)
        except OSError:
            pass  # the ETA of a later run is not worth failing this one
