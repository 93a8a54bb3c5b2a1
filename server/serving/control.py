"""Every call that is not an inference, written once for every protocol: which model a call
names, its readiness, the repository's index, load and unload, and the statistics a call
asks for. Each method returns plain values or raises a RequestError; the native gRPC
protocol, the standard gRPC protocol and REST turn both into their own messages and statuses
(transport/status.py's table, rest.py's HTTP codes), so the three cannot answer differently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from gradserve.server.core.errors import Closed, InvalidInput, UnknownModel
from gradserve.server.core.registry import Models, Served
from gradserve.server.core.repository import READY, Owner, VersionStatus, known
from gradserve.server.core.statistics import Statistics

StatisticsSource = Callable[[], Awaitable[dict[tuple[str, str], Statistics]]]
# A parameter a load or unload may carry: no model depends on another here, so there are no
# dependents to unload, and saying so changes nothing.
_HARMLESS = frozenset({"unload_dependents"})
_LOADING = "the server is still loading its models; retry once it is ready (/v2/health/ready)"


class ControlPlane:
    """The server's models as every protocol's control calls see them. Until `serve` has
    given the models, every call but readiness is refused UNAVAILABLE (Closed)."""

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self.is_ready = is_ready
        self._models: Models | None = None
        self._owner: Owner | None = None
        self._statistics: StatisticsSource | None = None

    def serve(self, models: Models, owner: Owner, statistics: StatisticsSource) -> None:
        self._models, self._owner, self._statistics = models, owner, statistics

    @property
    def models(self) -> Models:
        if self._models is None:
            raise Closed(_LOADING)
        return self._models

    @property
    def owner(self) -> Owner:
        if self._owner is None:
            raise Closed(_LOADING)
        return self._owner

    def served(self, name: str, version: str = "", *, named: bool = True) -> Served:
        """The version a call names (`version` "": the one to serve); UnknownModel when not
        served. `named`: the protocol requires a model name (the standard protocol does; the
        native one serves the only model when none is named)."""
        models = self.models
        if named and not name:
            raise UnknownModel(
                f"no model named; this server serves {[s.spec.name for s in models]}"
            )
        return models.get(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether a model version takes requests now: not while the repository knows it but
        does not serve it (loading, failed, unloaded), nor while the server is not ready;
        UnknownModel when nothing of that name (and version) is known."""
        try:
            self.served(name, version)
        except UnknownModel:
            if not known(self.owner.statuses(), name, version):
                raise
            return False
        return self.is_ready()

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        """The repository index: every version known (only READY ones, if asked)."""
        return [s for s in self.owner.statuses() if s.state == READY or not ready_only]

    async def control(self, operation: str, name: str, parameters: Iterable[str] = ()) -> None:
        """`load` or `unload` model `name` (explicit control), with no parameter that would
        change its files."""
        given = sorted(set(parameters) - _HARMLESS)
        if given:
            raise InvalidInput(
                f"{operation} takes the model's files as they are in the repository; "
                f"parameters {given} are not supported"
            )
        await self.owner.request(operation, name)

    async def statistics(self, name: str, version: str) -> list[tuple[str, str, Statistics]]:
        """The statistics a call asks for: every served version (no name), every served
        version of the named model, or the one named; UnknownModel for one not served."""
        models = self.models
        if name:
            models.get(name, version)  # is it served?
        everything = await self._statistics()
        if not name:
            return [(*key, everything[key]) for key in sorted(everything)]
        versions = [version] if version else models.versions(name)
        return [(name, v, everything.get((name, v), Statistics())) for v in versions]
