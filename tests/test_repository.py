"""The model repository alone (core/repository.py): the layout, the version policies, and the
moves between served sets (load beside, retire after) with a recording host. No TensorFlow:
the loader returns stand-in engines or raises as a corrupt file would."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from gradserve.server.core.errors import ControlRefused, LoadFailed, UnknownModel
from gradserve.server.core.repository import (
    NOT_LOADED,
    READY,
    UNAVAILABLE,
    UNLOADING,
    Repository,
    RepositoryError,
    VersionPolicy,
    model_file,
    scan,
)

LATEST = VersionPolicy()


def _version(root: Path, name: str, version: int, content: str = "weights") -> Path:
    folder = root / name / str(version)
    folder.mkdir(parents=True)
    (folder / "model.keras").write_text(content)
    return folder


class _Host:
    """Records what the repository asks; retiring resolves when the test releases it."""

    def __init__(self) -> None:
        self.served: list[tuple[str, int]] = []
        self.pending: dict[tuple[str, int], concurrent.futures.Future] = {}
        self.events: list[str] = []

    def serve(self, name: str, version: int, engine: object) -> None:
        self.served.append((name, version))
        self.events.append(f"serve {name}:{version}")

    def retire(self, name: str, version: int) -> concurrent.futures.Future:
        self.served.remove((name, version))
        self.events.append(f"retire {name}:{version}")
        future = self.pending[(name, version)] = concurrent.futures.Future()
        return future

    def release(self, name: str, version: int) -> None:
        self.pending.pop((name, version)).set_result(None)


def _load(name: str, version: int, path: Path) -> object:
    if model_file(path).read_text() == "corrupt":
        raise ValueError(f"cannot load {path}: not a zip file")
    return (name, version)


def _repository(root: Path, control: str = "poll", policy: VersionPolicy = LATEST):
    host = _Host()
    repository = Repository(lambda: scan(root, policy), _load, control=control)
    repository.start(host)
    return repository, host


def _states(repository: Repository) -> dict[tuple[str, int], str]:
    return {(s.name, s.version): s.state for s in repository.statuses()}


def test_policies_parse_choose_and_refuse_what_they_cannot_mean():
    assert VersionPolicy.parse("latest 2").choose([1, 2, 3]) == {2, 3}
    assert VersionPolicy.parse("latest").choose([4, 1]) == {4}
    assert VersionPolicy.parse("all").choose([1, 2, 3]) == {1, 2, 3}
    assert VersionPolicy.parse("specific 1, 3").choose([1, 2]) == {1}
    assert str(VersionPolicy.parse("specific 3 1")) == "specific 1 3"
    for bad in ("latest 0", "newest", "specific", "specific x", "all 2", ""):
        with pytest.raises(RepositoryError, match="expected 'latest N'"):
            VersionPolicy.parse(bad)


def test_the_layout_versions_a_flat_file_a_saved_model_and_a_policy_file(tmp_path):
    _version(tmp_path, "a", 1)
    _version(tmp_path, "a", 10)
    (tmp_path / "a" / "model.toml").write_text('version_policy = "all"\n')
    (tmp_path / "flat.keras").write_text("w")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_text("pb")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / ".hidden").mkdir()
    found = scan(tmp_path, LATEST)
    assert sorted(found) == ["a", "flat", "saved"]
    assert sorted(found["a"].versions) == [1, 10] and str(found["a"].policy) == "all"
    assert found["flat"].versions == {1: tmp_path / "flat.keras"}
    assert found["saved"].versions == {1: saved} and model_file(saved) == saved
    empty = tmp_path / "a" / "11"
    empty.mkdir()
    with pytest.raises(RepositoryError, match="holds no model"):
        model_file(empty)


def test_a_new_version_is_served_before_the_old_one_is_retired_and_released_after(tmp_path):
    _version(tmp_path, "m", 1)
    repository, host = _repository(tmp_path)
    assert host.served == [("m", 1)] and _states(repository) == {("m", 1): READY}
    _version(tmp_path, "m", 2)
    repository.poll()
    assert host.events == ["serve m:1", "serve m:2", "retire m:1"]
    assert _states(repository) == {("m", 1): UNLOADING, ("m", 2): READY}
    host.release("m", 1)  # its last admitted request answered
    assert _states(repository)[("m", 1)] == UNAVAILABLE


def test_a_corrupt_version_retires_nothing_and_is_retried_only_once_its_files_change(tmp_path):
    _version(tmp_path, "m", 2)
    repository, host = _repository(tmp_path)
    bad = _version(tmp_path, "m", 3, "corrupt")
    repository.poll()
    repository.poll()
    assert host.served == [("m", 2)]
    (status,) = [s for s in repository.statuses() if s.version == 3]
    assert status.state == UNAVAILABLE and "not a zip file" in status.reason
    assert host.events == ["serve m:2"]  # tried once: the same files are not loaded again
    (bad / "model.keras").write_text("fixed, and longer than before")
    repository.poll()
    assert host.events == ["serve m:2", "serve m:3", "retire m:2"]


def test_latest_two_serves_two_and_specific_pins_one(tmp_path):
    for version in (1, 2, 3):
        _version(tmp_path, "m", version)
    repository, host = _repository(tmp_path, policy=VersionPolicy.parse("latest 2"))
    assert sorted(host.served) == [("m", 2), ("m", 3)]
    (tmp_path / "m" / "model.toml").write_text('version_policy = "specific 1"')
    repository.poll()
    assert host.served == [("m", 1)]


def test_explicit_control_loads_only_when_asked_and_the_other_modes_refuse(tmp_path):
    _version(tmp_path, "m", 1)
    repository, host = _repository(tmp_path, control="explicit")
    assert host.served == [] and repository.statuses()[0].reason == NOT_LOADED
    repository.load("m")
    assert host.served == [("m", 1)]
    _version(tmp_path, "m", 2, "corrupt")
    with pytest.raises(LoadFailed, match="version 2 of 'm' failed to load"):
        repository.load("m")
    assert host.served == [("m", 1)]
    repository.unload("m")
    assert host.served == []
    with pytest.raises(UnknownModel):
        repository.load("absent")
    with pytest.raises(UnknownModel, match="not loaded"):
        repository.unload("m")
    polling, _ = _repository(tmp_path, control="poll")
    with pytest.raises(ControlRefused, match="--model-control explicit"):
        polling.load("m")


def test_a_model_folder_removed_is_retired(tmp_path):
    folder = _version(tmp_path, "m", 1)
    repository, host = _repository(tmp_path)
    (folder / "model.keras").unlink()
    folder.rmdir()
    (tmp_path / "m").rmdir()
    repository.poll()
    assert host.served == [] and host.events[-1] == "retire m:1"
