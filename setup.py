"""Package discovery for setuptools (the metadata is in pyproject.toml).

The guest agent (hyperstart/) and the drivers (drivers/) live beside runv_py/ in the
checkout but are installed inside it, as runv_py.hyperstart and runv_py.drivers:
pyproject.toml's discovery cannot rename what it finds, so the packages are found here,
under each folder, with their installed names. tests/ and bench/ are not packages of it.
"""
from setuptools import find_packages, setup

# installed name -> folder in the checkout
FOLDERS = {"runv_py": "runv_py", "runv_py.drivers": "drivers",
           "runv_py.hyperstart": "hyperstart"}


def packages() -> list:
    found = []
    for name, folder in FOLDERS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


setup(packages=packages(), package_dir=FOLDERS)
