"""The served models by name: each with its spec and its own batcher (queue).

All batchers share one engine thread, so the device is driven from one place; batches never
mix models. Validation that depends on the model (shapes, result size) lives here, shared by
every protocol.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from gradserve.server.core.batcher import Batcher
from gradserve.server.core.contract import ModelSpec, vectors_per_row
from gradserve.server.core.errors import InvalidInput, UnknownModel
from gradserve.server.core.explain import Limits, Options, Work, expand
from gradserve.server.core.statistics import Statistics
from gradserve.server.core.validation import decode_rows
from gradserve.wire.kinds import Derivative
from gradserve.wire.limits import MIB


@dataclass(frozen=True)
class Served:
    """One served model: what it is, its queue, what one request of it may produce, and
    its statistics (the batcher's watch counts its batches)."""

    spec: ModelSpec
    batcher: Batcher
    max_result_bytes: int
    statistics: Statistics = field(default_factory=Statistics)

    @functools.cached_property
    def dtype(self) -> np.dtype:
        return np.dtype(self.spec.dtype)

    @functools.cached_property
    def limits(self) -> Limits:
        """What an expanded request (explanations, k tangents) must fit in."""
        return Limits(max_rows=self.batcher.max_queue_rows, max_result_bytes=self.max_result_bytes)

    def decode_baseline(self, baseline: tuple[bytes, list[int], np.dtype]) -> np.ndarray:
        """A validated integrated-gradients baseline [m, *X] (m is checked against n later)."""
        return decode_rows(*baseline, self.spec.input_shape, "baseline", self.dtype)

    def decode(
        self, kind: Derivative, x: tuple[bytes, list[int], np.dtype], v: tuple | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Validated rows x (and the vector v the kind needs), in the model's dtype."""
        rows = decode_rows(*x, self.spec.input_shape, "x", self.dtype)
        vector_shape = self.spec.vector_shape(kind)
        if vector_shape is None:
            if v is not None:
                raise InvalidInput(f"v is only for vjp, jvp and hvp, not {kind.value}")
            vector = None
        else:
            if v is None:
                rows_shape = f"[n, {', '.join(map(str, vector_shape))}]"
                raise InvalidInput(f"{kind.value} needs the vector v, shape {rows_shape}")
            vector_shape = vectors_per_row(kind, vector_shape, v[1])
            vector = decode_rows(*v, vector_shape, "v", self.dtype)
            if vector.shape[0] != rows.shape[0]:
                raise InvalidInput(
                    f"v has {vector.shape[0]} rows but x has {rows.shape[0]}; one v per row of x"
                )
        self._check_result_size(kind, rows.shape[0])
        return rows, vector

    def expand(
        self, kind: Derivative, x: np.ndarray, v: np.ndarray | None, options: Options | None
    ) -> Work:
        """The rows to queue for validated rows x (and v), within this server's limits."""
        return expand(self.spec, self.limits, kind, x, v, options)

    def _check_result_size(self, kind: Derivative, n: int) -> None:
        size = n * self.spec.result_row_bytes(kind)
        if size > self.max_result_bytes:
            raise InvalidInput(
                f"the {kind.value} of {n} rows would be {size / MIB:.1f} MiB, over the "
                f"{self.max_result_bytes / MIB:.0f} MiB limit (--max-result-mb); send fewer "
                "rows, or ask for products instead: vjp, jvp or hvp"
            )


class Models:
    """Name -> its served versions, the highest being the default of requests that name no
    version. Changed only on the event loop's thread (the server's host), between requests:
    a request takes its version once, when it is decoded, and queues every row it has on
    that version's batcher at once, so a swap never mixes versions within one answer."""

    def __init__(self, served: list[Served] = ()) -> None:
        self._by_name: dict[str, dict[str, Served]] = {}
        self._default: dict[str, Served] = {}
        for one in served:
            self.add(one)

    def __iter__(self) -> Iterator[Served]:
        """The default (highest) version of each model."""
        return iter(list(self._default.values()))

    def every_version(self) -> list[Served]:
        return [s for versions in self._by_name.values() for s in versions.values()]

    def add(self, served: Served) -> None:
        """Serve this version; from now on the default if it is the model's highest."""
        self._by_name.setdefault(served.spec.name, {})[served.spec.version] = served
        self._pick_default(served.spec.name)

    def remove(self, name: str, version: str) -> Served | None:
        """Route no request to this version any more; the Served, if it was served."""
        served = self._by_name.get(name, {}).pop(version, None)
        self._pick_default(name)
        return served

    def _pick_default(self, name: str) -> None:
        versions = self._by_name.get(name)
        if versions:
            self._default[name] = versions[max(versions, key=int)]
        else:
            self._by_name.pop(name, None)
            self._default.pop(name, None)

    def get(self, name: str, version: str = "") -> Served:
        """The model a request names ("" for the only one) at `version` ("" for the
        default)."""
        if not name and len(self._default) == 1:
            served = next(iter(self._default.values()))
        else:
            served = self._default.get(name)
        if served is None:
            names = sorted(self._default)
            if not names:
                what = f"model {name!r} is not served" if name else "no model is named"
                raise UnknownModel(
                    f"{what}: this server serves no model now (its repository index says "
                    "which versions exist and why they do not serve)"
                )
            if not name:
                raise InvalidInput(f"several models are served; name one of {names}")
            served_names = ", ".join(map(repr, names))
            raise UnknownModel(
                f"model {name!r} is not served here; this server serves {served_names}"
            )
        if version in ("", served.spec.version):
            return served
        versions = self._by_name[served.spec.name]
        if version not in versions:
            available = sorted(versions, key=int)
            raise UnknownModel(
                f"version {version!r} of model {served.spec.name!r} is not served; "
                f"available: {available}"
            )
        return versions[version]

    def versions(self, name: str) -> list[str]:
        """The served versions of `name`, lowest first."""
        return sorted(self._by_name.get(name, {}), key=int)
