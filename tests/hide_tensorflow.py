"""Import first in a subprocess to make TensorFlow look uninstalled (as on a training machine)."""

import importlib.machinery
import sys


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [
    _PathFinderWithoutTensorFlow if f is importlib.machinery.PathFinder else f
    for f in sys.meta_path
]
