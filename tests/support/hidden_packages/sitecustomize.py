"""Hides packages, for a Python started with this folder on PYTHONPATH: by default the ones the lent
GPU machine lacks, else those named in HIDDEN_PACKAGES (comma-separated, e.g. `transformers`).

Python imports `sitecustomize` at start-up; the finder below, first on the meta path, refuses
the hidden packages as if they were not installed, so that bench/gpu.py's smoke run fails in CI
the moment anything it imports reaches for one of them, and a command can be run as a user who
installed gptflow without an extra (`gptflow export` without `hf`)."""

import os
import sys
from importlib.abc import MetaPathFinder

LENT_GPU_MACHINE_LACKS = "prefect,mlflow,datasketch,datasets,dask"
HIDDEN = set(os.environ.get("HIDDEN_PACKAGES", LENT_GPU_MACHINE_LACKS).split(","))


class HideFinder(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/support/hidden_packages)", name=name)
        return None


sys.meta_path.insert(0, HideFinder())
