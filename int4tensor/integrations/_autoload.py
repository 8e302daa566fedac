"""Registers the transformers integration when transformers is imported, without importing it.

A checkpoint of ours loaded by transformers without our quantizer registered gets randomly
initialized weights and only a warning from transformers ("Unknown quantization type"). With
``import int4tensor`` anywhere before (or after) ``import transformers``, the quantizer is
registered as soon as both are imported; ``import int4tensor`` alone still does not import
transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_TARGET = "transformers"


def register_now() -> None:
    try:
        import int4tensor.integrations.transformers  # noqa: F401  (registers on import)
    except ImportError:
        pass  # a transformers without the quantizer hooks: the integration is unavailable
    except Exception as e:  # never break `import transformers` for the user
        warnings.warn(f"int4tensor: could not register the transformers integration: {e}")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers with the other finders and runs :func:`register_now` once its
    ``__init__`` has executed."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        inner = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                if _finder in sys.meta_path:
                    sys.meta_path.remove(_finder)
                register_now()

            def __getattr__(self, name):  # get_resource_reader, is_package, get_data, ...
                return getattr(inner, name)

        spec.loader = _Loader()
        return spec


_finder = _RegisterAfterImport()


def install() -> None:
    if _TARGET in sys.modules:
        register_now()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
