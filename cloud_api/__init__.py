"""The cloud: the frozen backbone served over HTTP (FastAPI + uvicorn).

`create_app(CloudSettings(...))` builds the application; `spa cloud` / `spa-cloud` serve it.
See README.md ("Cloud API") for the endpoints, encodings and limits.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spa-demo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
