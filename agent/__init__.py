"""edgewatch agent: the torch-free part that runs on the gateway."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgewatch")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
