"""FFCV data: ImageFolder -> .beton writer, loaders and traversal orders.

Importing this package imports ffcv, without the 4.2-4.7 s that ffcv's own import spends
compiling numba's typed dictionary: ``ffcv.fields.rgb_image`` fills a two-entry ``numba.typed.Dict``
(``IMAGE_MODES``) at import, and the first ``__setitem__`` compiles numba's dict code, in every
process. ffcv reads that dict only from Python (when a decoder generates its code, and in its
writer), so a plain ``dict`` with the same entries behaves the same. Every ffcv import in this
package comes after this one; tests/test_loaders.py checks the entries.
"""
import numba.typed as _typed

_typed_dict = _typed.Dict
_typed.Dict = dict  # read by `from numba.typed import Dict` in the ffcv modules imported next
try:
    import ffcv.fields.rgb_image  # noqa: E402,F401
finally:
    _typed.Dict = _typed_dict
del _typed, _typed_dict
