"""Import ffcv 1.0.2 the way this project needs it; every module that uses ffcv imports this first.

* Without the 4.2-4.7 s that ffcv's own import spends compiling numba's typed dictionary:
  ``ffcv.fields.rgb_image`` fills a two-entry ``numba.typed.Dict`` (``IMAGE_MODES``) at import,
  and the first ``__setitem__`` compiles numba's dict code, in every process. ffcv reads that dict
  only from Python (when a decoder generates its code, and in its writer), so a plain ``dict``
  with the same entries behaves the same (tests/test_ffcv_patch.py checks the entries).
* On Python 3.12 without setuptools' distutils shim: ffcv's ``pipeline/graph.py`` starts with
  ``from distutils.log import warn`` (a name it never calls), so a stub ``distutils.log`` stands in
  when, and only when, ``import distutils.log`` fails.
"""
import sys

import numba.typed as _typed

try:
    import distutils.log  # noqa: F401 — the stdlib's (<= 3.11) or setuptools' shim
except ImportError:
    import logging
    import types
    _log = types.ModuleType("distutils.log")
    _log.warn = logging.getLogger("ffcv").warning
    _pkg = types.ModuleType("distutils")
    _pkg.__path__ = []  # a package: `import distutils.core` still fails, as it would without us
    _pkg.log = _log
    sys.modules["distutils"], sys.modules["distutils.log"] = _pkg, _log
    del logging, types, _log, _pkg

_typed_dict = _typed.Dict
_typed.Dict = dict  # read by `from numba.typed import Dict` in the ffcv modules imported next
try:
    import ffcv.fields.rgb_image  # noqa: E402,F401
finally:
    _typed.Dict = _typed_dict
del _typed, _typed_dict
