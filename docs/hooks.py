"""MkDocs hooks (mkdocs.yml `hooks:`): what the build needs before its plugins start."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The SDK's packages as Python names them (gradserve.client), for mkdocstrings (mkdocs.yml's
# `paths`): setup.py maps the gradserve namespace onto top folders, which griffe cannot follow.
API_ROOT = ROOT / "build" / "docs-api"
NAMESPACE = {"client": "client", "wire": "wire", "v1": "protos/gradserve/v1"}


def on_startup(command: str, dirty: bool) -> None:
    """Link build/docs-api/gradserve/<package> to its folder before mkdocstrings looks."""
    package = API_ROOT / "gradserve"
    package.mkdir(parents=True, exist_ok=True)
    for name, folder in NAMESPACE.items():
        link = package / name
        if not link.is_symlink():
            link.symlink_to(ROOT / folder, target_is_directory=True)
