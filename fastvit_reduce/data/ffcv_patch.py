"""Import ffcv 1.0.2 the way this project needs it; every module that uses ffcv imports this first.

* Without the 4.2-4.7 s that ffcv's own import spends compiling numba's typed dictionary:
  ``ffcv.fields.rgb_image`` fills a two-entry ``numba.typed.Dict`` (``IMAGE_MODES``) at import,
  and the first ``__setitem__`` compiles numba's dict code, in every process. ffcv reads that dict
  only from Python (when a decoder generates its code, and in its writer), so a plain ``dict``
  with the same entries behaves the same (tests/test_loaders.py checks the entries).
"""
import numba.typed as _typed

_typed_dict = _typed.Dict
_typed.Dict = dict  # read by `from numba.typed import Dict` in the ffcv modules imported next
try:
    import ffcv.fields.rgb_image  # noqa: E402,F401
finally:
    _typed.Dict = _typed_dict
del _typed, _typed_dict
