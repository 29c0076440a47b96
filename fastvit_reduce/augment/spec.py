"""timm RandAugment spec strings and op tables, torch-free (the config checker parses specs).

The tables are timm 1.0's ``auto_augment`` lists, in timm's order; ``parse_spec`` turns a spec
(``rand-m9-mstd0.5-inc1``) into the settings ``fastvit_reduce.augment.randaugment`` applies.
"""
from __future__ import annotations

import math
import re

_LEVEL_DENOM = 10.0  # timm: 'M' magnitude scale → fraction of each op's range

# timm 1.0.31 auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS (same order)
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# timm 1.0.31 _RAND_WEIGHTED_0 (spec '-tweights'): always the increasing ops, whatever 'inc' says
RAND_WEIGHTED_0 = {
    "Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
    "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
    "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
    "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05, "Invert": 0.05,
}
# timm < 1.0 _RAND_CHOICE_WEIGHTS_0 (spec '-w0', removed in timm 1.0): old timm looked the
# weights up by the names of RAND_TRANSFORMS and applied them by position to the chosen op
# list, so with inc1 they carry over to the increasing variants.
RAND_CHOICE_WEIGHTS_0 = {
    "Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
    "Color": .025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": .005,
    "SolarizeAdd": .005, "Contrast": .005, "Brightness": .005, "Equalize": .005,
    "Posterize": 0, "Invert": 0,
}

GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED_OPS = GEOMETRIC_OPS + ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                              "SharpnessIncreasing")


# ----------------------------------------------------------------------------- spec parsing
def parse_spec(spec: str) -> dict:
    """Parse a timm RandAugment spec (``rand-m9-mstd0.5-inc1``) into its settings.

    Returns ``dict(ops, weights, n, magnitude, magnitude_std, magnitude_max, prob)`` with timm's
    defaults (m 10, n 2, p 0.5, mstd 0, mmax None = 10, inc 0). Raises ValueError naming the bad
    part; unlike timm, a section without a number is an error rather than silently ignored.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("RandAugment spec is empty: use e.g. 'rand-m9-mstd0.5-inc1'")
    parts = spec.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-'")
    numeric = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int, "w": int}
    values, transforms = {}, None
    for part in parts[1:]:
        if part.startswith("t"):
            transforms = transforms or part[1:]  # timm: the first 't' section wins
            continue
        match = re.fullmatch(r"(\D*)(\d.*)", part)  # timm: re.split(r'(\d.*)', part)
        key = match.group(1) if match else part
        if key not in numeric:
            raise ValueError(f"RandAugment spec {spec!r}: unknown section {part!r} "
                             "(known: m, n, p, mstd, mmax, inc, w0, t<set>)")
        try:
            value = numeric[key](match.group(2))
        except ValueError:
            raise ValueError(f"RandAugment spec {spec!r}: bad number in section {part!r}") from None
        if key in ("mstd", "mmax") and key in values:
            continue  # timm sets these with dict.setdefault: the first occurrence wins
        values[key] = value

    mstd = values.get("mstd", 0.0)
    out = dict(magnitude=float(values.get("m", _LEVEL_DENOM)), n=values.get("n", 2),
               prob=values.get("p", 0.5), magnitude_max=values.get("mmax"),
               magnitude_std=math.inf if mstd > 100 else mstd)  # timm: > 100 = uniform in [0, m]
    ops = RAND_INCREASING_TRANSFORMS if values.get("inc", 0) else RAND_TRANSFORMS
    weights = None
    if transforms is not None:
        if transforms != "weights":
            raise ValueError(f"RandAugment spec {spec!r}: transform set {transforms!r} is not "
                             "supported (only 'tweights'; timm's '3a'/'3aw' are not implemented)")
        ops, weights = tuple(RAND_WEIGHTED_0), tuple(RAND_WEIGHTED_0.values())
    elif "w" in values:
        if values["w"] != 0:
            raise ValueError(f"RandAugment spec {spec!r}: only weight set w0 exists")
        weights = tuple(RAND_CHOICE_WEIGHTS_0[name] for name in RAND_TRANSFORMS)
    if not 0 <= out["prob"] <= 1:
        raise ValueError(f"RandAugment spec {spec!r}: p must be in [0, 1]")
    if weights is not None and out["n"] > sum(w > 0 for w in weights):
        raise ValueError(f"RandAugment spec {spec!r}: weighted choice draws ops without "
                         f"replacement, so n must be <= {sum(w > 0 for w in weights)}")
    out.update(ops=tuple(ops), weights=weights)
    return out
