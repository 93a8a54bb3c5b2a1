"""Which folder holds which package: the one part of the build that pyproject.toml cannot say.

Each top folder is one package of the `gradserve` namespace (the generated protocol packages
keep their proto package's name). setuptools' own discovery finds every subpackage beneath a
folder, so a new subpackage is in the wheel without being listed anywhere. Everything else
about the project is in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "gradserve.v1": "protos/gradserve/v1",
    "gradserve.inference": "protos/gradserve/inference",
    "gradserve.wire": "wire",
    "gradserve.server": "server",
    "gradserve.client": "client",
}


def packages() -> list[str]:
    """Every package under FOLDERS, named by its place in the gradserve namespace."""
    found = []
    for name, folder in FOLDERS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return found


setup(packages=packages(), package_dir=FOLDERS)
