"""Hides the packages the lent GPU machine lacks, for a Python started with this folder on PYTHONPATH.

Python imports `sitecustomize` at start-up; the finder below, first on the meta path, refuses
the pipeline's own dependencies as if they were not installed, so that bench/gpu.py's smoke
run fails in CI the moment anything it imports reaches for one of them."""

import sys
from importlib.abc import MetaPathFinder

HIDDEN = {"prefect", "mlflow", "datasketch", "datasets", "dask"}


class HideFinder(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: not on the lent GPU machine)", name=name)
        return None


sys.meta_path.insert(0, HideFinder())
