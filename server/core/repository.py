"""The model repository: which model versions are on disk, which of them to serve (the version
policy), and the loading and retiring that moves the served set there without downtime.

Layout: `DIR/<name>/<version>/` with integer versions, each holding one model file (.keras,
.h5) or SavedModel folder, or being a SavedModel itself; a model file or SavedModel directly
at `DIR/<name>` (or given with --model) is version 1. `DIR/<name>/model.toml` may set the
model's policy, `version_policy = "latest 2"` (or "all", or "specific 1 3"); else the
server's --version-policy.

A swap loads and warms up the new version beside the old ones (the old ones keep serving),
hands it to the host (new requests without a version go to the highest served version from
then on), and only once every version the policy wants is serving retires the versions it no
longer wants: the host stops routing to them and releases each when its last admitted
request is answered. A version that fails to load is reported and retires nothing.

Blocking: one loader thread (the caller's) loads at a time; the host marshals into its own
thread. No TensorFlow: the host's loader builds the engines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gradserve.server.core.contract import Engine
from gradserve.server.core.errors import ControlRefused, LoadFailed, StartRefused, UnknownModel

log = logging.getLogger("gradserve")

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".pt2")  # .pt2: --backend torch
POLICY_FILE = "model.toml"
CONTROLS = ("none", "poll", "explicit")
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
NOT_LOADED = "not loaded"


class RepositoryError(ValueError):
    """A repository entry or policy that is not what the layout allows."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions to serve: the `latest` N, `all`, or `specific` ones."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest N` (N >= 1; `latest` alone is 1), `all`, or `specific V [V ...]`."""
        words = text.replace(",", " ").split()
        try:
            if words and words[0] == "all" and len(words) == 1:
                return cls("all", 0)
            if words and words[0] == "latest" and len(words) <= 2:
                count = int(words[1]) if len(words) == 2 else 1
                if count >= 1:
                    return cls("latest", count)
            if words and words[0] == "specific" and len(words) >= 2:
                return cls("specific", 0, tuple(sorted({int(w) for w in words[1:]})))
        except ValueError:
            pass
        raise RepositoryError(
            f"version policy {text!r}: expected 'latest N' (N >= 1), 'all' or "
            "'specific V [V ...]' (integer versions)"
        )

    def choose(self, available: list[int]) -> set[int]:
        """The versions to serve of those on disk."""
        if self.kind == "all":
            return set(available)
        if self.kind == "specific":
            return set(available) & set(self.versions)
        return set(sorted(available)[-self.count :])

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific " + " ".join(map(str, self.versions))
        return "all" if self.kind == "all" else f"latest {self.count}"


@dataclass(frozen=True)
class Source:
    """One model on disk: its versions (number -> path) and the policy that picks among them.
    `static` models (--model entries) load at start whatever the control mode."""

    versions: dict[int, Path]
    policy: VersionPolicy
    static: bool = False


@dataclass(frozen=True)
class VersionStatus:
    """One model version as the repository index reports it."""

    name: str
    version: int
    state: str
    reason: str = ""


def known(statuses: list[VersionStatus], name: str, version: str = "") -> bool:
    """Whether the index has model `name` (at `version`, "" for any)."""
    return any(s.name == name and version in ("", str(s.version)) for s in statuses)


def model_file(path: Path) -> Path:
    """The model to load for a version folder (or a model given directly): a SavedModel folder
    as it is, else the one model file or SavedModel inside it."""
    if path.is_file() or (path / "saved_model.pb").exists():
        return path
    if not path.is_dir():
        raise RepositoryError(f"{path} does not exist")
    found = [p for p in sorted(path.iterdir()) if _is_model(p)]
    if len(found) != 1:
        what = "no model" if not found else f"{len(found)} models ({[p.name for p in found]})"
        raise RepositoryError(
            f"{path} holds {what}; a version folder holds one .keras/.h5/.pt2 file or SavedModel"
        )
    return found[0]


def _is_model(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return path.suffix in MODEL_SUFFIXES or (path / "saved_model.pb").exists()


def scan(root: Path, default: VersionPolicy) -> dict[str, Source]:
    """Every model in the repository folder `root`, by name."""
    models = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.suffix in MODEL_SUFFIXES:
                models[entry.stem] = Source({1: entry}, default)
            continue
        versions = {int(p.name): p for p in entry.iterdir() if p.is_dir() and p.name.isdigit()}
        if not versions and _is_model(entry):
            versions = {1: entry}
        if versions:
            models[entry.name] = Source(versions, _policy(entry, default))
    return models


def _policy(folder: Path, default: VersionPolicy) -> VersionPolicy:
    file = folder / POLICY_FILE
    if not file.exists():
        return default
    try:
        text = tomllib.loads(file.read_text()).get("version_policy", str(default))
        return VersionPolicy.parse(str(text))
    except (tomllib.TOMLDecodeError, RepositoryError, OSError) as exc:
        log.error("%s: %s; using %s", file, exc, default, extra={"event": "bad_policy"})
        return default


def signature(path: Path) -> tuple:
    """What a version's files are now (names, sizes, times): a failed version is retried
    by polling only once its files have changed."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


class Host(Protocol):
    """Whoever serves the loaded versions (the server, or the engine process)."""

    def serve(self, name: str, version: int, engine: Engine) -> None:
        """Serve `engine` as this version from now on (returns once it is routed to)."""

    def retire(self, name: str, version: int) -> concurrent.futures.Future:
        """Route no new request to this version; the future is done once the last admitted
        one is answered and the version is released."""


class LoadObserver(Protocol):
    def version_loaded(self, name: str, ok: bool, seconds: float) -> None: ...
    def versions_served(self, name: str, count: int) -> None: ...
    def swap_finished(self, name: str, seconds: float) -> None: ...
    def selfcheck(self, name: str, version: int, passed: bool) -> None: ...


class Owner(Protocol):
    """What a server asks of whoever owns its models' versions: this process's Repository, or
    the engine process's, seen from a frontend."""

    def start(self, host: Host, poll_seconds: float = 0.0) -> None:
        """Serve the versions to serve at start (blocking), then follow the control mode."""

    def statuses(self) -> list[VersionStatus]: ...

    async def request(self, operation: str, name: str) -> None:
        """`load` or `unload` model `name` (explicit control)."""

    def close(self) -> None: ...


# Loads and warms up one version: (name, version, its path in the repository) -> Engine.
Loader = Callable[[str, int, Path], Engine]


class Repository:
    """The served versions of every model, moved to what `sources()` and the policies want.

    `sources` says what is on disk; `load` builds one version's engine; `control` is the
    --model-control mode (the load/unload operations are for `explicit` only).
    """

    def __init__(
        self,
        sources: Callable[[], dict[str, Source]],
        load: Loader,
        *,
        control: str = "none",
        observer: LoadObserver | None = None,
    ) -> None:
        if control not in CONTROLS:
            raise RepositoryError(f"--model-control must be one of {CONTROLS}, got {control!r}")
        self.control = control
        self._sources = sources
        self._load = load
        self._observer = observer
        self._host: Host | None = None
        self._lock = threading.RLock()  # one load or unload at a time
        self._status_lock = threading.Lock()
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._served: dict[str, set[int]] = {}
        self._failed: dict[tuple[str, int], tuple] = {}  # signatures of failed loads
        self._stop = threading.Event()
        self._starting = False  # loading the versions to serve at start
        self._poller: threading.Thread | None = None
        self.on_change: Callable[[], None] = lambda: None

    @classmethod
    def fixed(cls, engines: list[Engine], observer: LoadObserver | None = None) -> Repository:
        """Version 1 of each of these engines, already loaded (tests, stand-in engines)."""
        by_name = {engine.name: engine for engine in engines}
        static = {name: Source({1: Path(name)}, VersionPolicy(), True) for name in by_name}
        return cls(lambda: static, lambda name, _v, _p: by_name[name], observer=observer)

    def start(self, host: Host, poll_seconds: float = 0.0) -> None:
        """Load what is to be served at start (blocking), then poll if the mode says so."""
        self._host = host
        with self._lock:
            self._starting = True
            try:
                for name, source in self._sources().items():
                    if source.static or self.control != "explicit":
                        self._sync(name, source, retry=True)
            finally:
                self._starting = False
        if self.control == "poll" and poll_seconds > 0:
            self._poller = threading.Thread(
                target=self._poll, args=(poll_seconds,), name="gradserve-poll", daemon=True
            )
            self._poller.start()

    def close(self) -> None:
        """Stop polling (a load under way finishes first)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()

    def statuses(self) -> list[VersionStatus]:
        """Every version known, with its state (the repository index): those loaded or tried,
        and those on disk never loaded (UNAVAILABLE, "not loaded")."""
        with self._status_lock:
            known = dict(self._status)
        try:
            on_disk = self._sources()
        except (OSError, RepositoryError, ValueError):
            on_disk = {}
        for name, source in on_disk.items():
            for version in source.versions:
                if (name, version) not in known:
                    known[(name, version)] = VersionStatus(name, version, UNAVAILABLE, NOT_LOADED)
        return sorted(known.values(), key=lambda s: (s.name, s.version))

    def poll(self) -> None:
        """Rescan the repository and move every model to what its policy wants."""
        with self._lock:
            sources = self._sources()
            for name, source in sources.items():
                self._sync(name, source, retry=False)
            for name in set(self._served) - set(sources):
                self._retire_all(name, "its folder was removed from the repository")

    def load(self, name: str) -> None:
        """Explicit control: load (or reload) `name` as its policy says; LoadFailed if a
        version it wants failed (the versions served before still are)."""
        self._check_control("load")
        with self._lock:
            source = self._sources().get(name)
            if source is None:
                raise UnknownModel(f"model {name!r} is not in the repository")
            failed = self._sync(name, source, retry=True)
        if failed:
            raise LoadFailed("; ".join(failed))

    def unload(self, name: str) -> None:
        """Explicit control: serve no version of `name` any more (admitted requests finish)."""
        self._check_control("unload")
        with self._lock:
            if not self._served.get(name):
                raise UnknownModel(f"model {name!r} is not loaded")
            self._retire_all(name, "unloaded")

    async def request(self, operation: str, name: str) -> None:
        """`load` or `unload` from an event loop: the loading runs on a worker thread."""
        await asyncio.to_thread(getattr(self, operation), name)

    def _check_control(self, operation: str) -> None:
        if self.control != "explicit":
            raise ControlRefused(
                f"model {operation} requests need --model-control explicit; this server "
                f"runs with {self.control!r}"
            )

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.poll()
            except Exception:
                log.exception("polling the model repository failed")

    def _sync(self, name: str, source: Source, *, retry: bool) -> list[str]:
        """Load each wanted version not yet served; once all are, retire the unwanted ones.
        Returns why wanted versions failed."""
        wanted = source.policy.choose(sorted(source.versions))
        served = self._served.setdefault(name, set())
        failed, started = [], time.monotonic()
        for version in sorted(wanted - served):
            path = source.versions[version]
            key = (name, version)
            mark = signature(path) if path.exists() else ()
            if not retry and self._failed.get(key) == mark:
                failed.append(self._status[key].reason)
                continue
            reason = self._load_version(name, version, path)
            if reason:
                self._failed[key] = mark
                failed.append(reason)
        if not failed and served - wanted:
            why = f"version policy {source.policy}: {sorted(wanted)} served instead"
            for version in sorted(served - wanted):
                self._retire(name, version, why, started)
        return failed

    def _load_version(self, name: str, version: int, path: Path) -> str:
        """Load, warm up and serve one version; the reason it failed, or ""."""
        self._set(name, version, LOADING)
        _log(logging.INFO, "loading a model version", "version_load", name, version, path=str(path))
        started = time.monotonic()
        try:
            engine = self._load(name, version, path)
            self._host.serve(name, version, engine)
        except Exception as exc:
            reason = f"version {version} of {name!r} failed to load: {exc}"
            self._set(name, version, UNAVAILABLE, reason)
            _log(logging.ERROR, reason, "version_load_failed", name, version)
            self._observe("version_loaded", name, False, time.monotonic() - started)
            if self._starting and isinstance(exc, StartRefused):
                raise  # the server stops: this machine cannot keep what its flags promise
            return reason
        self._served[name].add(version)
        self._failed.pop((name, version), None)
        self._set(name, version, READY)
        seconds = time.monotonic() - started
        _log(logging.INFO, "model version serving", "version_ready", name, version,
             seconds=round(seconds, 2))  # fmt: skip
        self._observe("version_loaded", name, True, seconds)
        self._observe("versions_served", name, len(self._served[name]))
        return ""

    def _retire_all(self, name: str, why: str) -> None:
        for version in sorted(self._served.get(name, ())):
            self._retire(name, version, why, time.monotonic())

    def _retire(self, name: str, version: int, why: str, started: float) -> None:
        self._served[name].discard(version)
        self._set(name, version, UNLOADING, why)
        self._observe("versions_served", name, len(self._served[name]))
        _log(logging.INFO, f"retiring a model version: {why}", "version_retire", name, version)

        def released(_future: concurrent.futures.Future) -> None:
            with self._status_lock:
                if self._status[(name, version)].state == UNLOADING:
                    self._status[(name, version)] = VersionStatus(name, version, UNAVAILABLE, why)
            self.on_change()
            seconds = time.monotonic() - started
            _log(logging.INFO, "model version released", "version_released", name, version,
                 seconds=round(seconds, 2))  # fmt: skip
            self._observe("swap_finished", name, seconds)

        self._host.retire(name, version).add_done_callback(released)

    def _set(self, name: str, version: int, state: str, reason: str = "") -> None:
        with self._status_lock:
            self._status[(name, version)] = VersionStatus(name, version, state, reason)
        self.on_change()

    def _observe(self, event: str, *args: object) -> None:
        if self._observer is not None:
            getattr(self._observer, event)(*args)


def _log(level: int, message: str, event: str, name: str, version: int, **fields: object) -> None:
    log.log(level, message, extra={"event": event, "model": name, "version": version, **fields})
