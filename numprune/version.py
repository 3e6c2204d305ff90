"""numprune's version, as installed (the package metadata, so pyproject.toml is its only source).

A module of its own, importing nothing of numprune, so that the report, the model card and the
command line can all record it without an import cycle through the package.
"""

from importlib.metadata import version

VERSION = version("numprune")
