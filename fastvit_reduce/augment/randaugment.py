"""RandAugment on a whole batch of images, on the device, with timm's semantics.

Why not timm's own: timm's RandAugment works on one PIL image at a time in the data workers,
which ffcv's pipeline has no place for (and timm 1.0.31's version crashes with Pillow 13, see
posterize below). This module runs the same policy on the uint8 (B, 3, H, W) batch after it
reaches the device.

What "the same policy" means here (timm 1.0.31 ``rand_augment_transform``, read, not guessed):

* spec strings ``rand-m9-mstd0.5-inc1``, ``rand-m9-n3-mstd0.5``, ``rand-m7-mmax10``,
  ``rand-m9-tweights``, ``rand-m9-w0`` (the pre-1.0 timm weighted choice), ``-p0.5``;
* the op set ``_RAND_TRANSFORMS`` / ``_RAND_INCREASING_TRANSFORMS`` (``inc1``), each image draws
  ``n`` ops (uniform with replacement; weighted sets without replacement, as
  ``np.random.choice`` does), each applied with probability ``p`` (0.5);
* magnitude per (image, op): ``m``, or ``gauss(m, mstd)``, or ``uniform(0, m)`` when mstd > 100,
  clipped to ``[0, mmax or 10]``; timm's level → argument mapping with ``_LEVEL_DENOM = 10`` and a
  random sign for signed ops; ``translate_pct`` 0.45 of the image side; fill = the dataset mean
  in 0..255, as timm's ``create_transform`` passes ``img_mean`` (ImageNet: 124, 116, 104).

Where we differ, and why:

* geometry (Rotate, ShearX/Y, TranslateX/YRel) is always **bilinear**, one ``grid_sample``
  per layer for all of them; timm picks PIL BILINEAR or BICUBIC at random per op. Bilinear
  matches PIL's BILINEAR to rounding; torch's bicubic kernel (a = -0.75) is not the one PIL's
  transform uses, so it would not match PIL's BICUBIC anyway (our bilinear differs from PIL's
  BICUBIC by 0.4-1.3 grey levels mean absolute difference on real photos).
* ``PosterizeIncreasing`` at magnitude 10 (and ``Posterize`` below magnitude 2.5) asks for 0 bits
  (negative with mmax > 10). Pillow < 13 returned a black image; Pillow 13 raises. We return
  black, timm's old meaning, and never raise.

Randomness and the device: every draw (op choice, apply coin, magnitude noise, sign) is made on
the batch's device from a ``torch.Generator`` the caller seeds, so a batch's augmentation is a
pure function of its seed. One set of draws, two ways to apply them, bit-identical (tested):

* CUDA ("where" path): every op runs on the whole batch and each image keeps its own op's result
  with ``torch.where``; nothing is read back by the host (no ``.item()``, no ``nonzero``, no
  per-batch ``torch.tensor(list)``; tests record the aten ops of a call), so the host can queue
  the call and run ahead.
* CPU ("grouped" path): per layer and op, the images that drew it are found with ``nonzero``,
  the op runs on them only and they are written back. There is no device to wait for on the
  CPU, and running one op per image instead of all 15 is ~11x faster (64 images at 64 px, one
  thread: 12.6 ms against 139 ms for the where path).

Pixel arithmetic follows PIL (ImageEnhance, ImageOps, Image.transform) step by step, including
where PIL truncates or rounds to uint8. Measured against timm's PIL ops on real photos
(tests/test_randaugment.py): every colour and histogram op is pixel-exact on uint8 input, and the
geometric ops match PIL's BILINEAR to within one grey level (mean absolute difference <= 0.08).
Float input in [0, 255] is processed without the uint8 quantisation, except that Equalize and
AutoContrast (defined by PIL on 256-bin histograms) read the integer grey level ``floor(x)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import _LEVEL_DENOM, GEOMETRIC_OPS, SIGNED_OPS, parse_spec  # noqa: F401 — re-exported


# ----------------------------------------------------------------------------- magnitude → argument
def level_to_arg(name: str, level: torch.Tensor, sign: torch.Tensor,
                 translate_pct: float = 0.45) -> torch.Tensor | None:
    """timm's ``LEVEL_TO_ARG[name]`` for a (b,) float64 tensor of magnitudes and ±1 signs.

    The expressions keep timm's order of operations so that float64 results are identical.
    """
    frac = level / _LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * (frac * 30.0)  # degrees, [-30, 30]
    if name in ("ShearX", "ShearY"):
        return sign * (frac * 0.3)  # shear factor, [-0.3, 0.3]
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (frac * translate_pct)  # fraction of the image side
    if name == "Posterize":
        return torch.trunc(frac * 4)  # bits kept, 0..4
    if name == "PosterizeIncreasing":
        return 4 - torch.trunc(frac * 4)  # bits kept, 4..0 (negative with mmax > 10)
    if name == "Solarize":
        return torch.trunc(frac * 256).clamp(max=256)  # threshold
    if name == "SolarizeIncreasing":
        return 256 - torch.trunc(frac * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.trunc(frac * 110).clamp(max=128)  # added to pixels < 128
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1  # enhance factor, [0.1, 1.9]
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing"):
        return (1.0 + sign * (frac * 0.9)).clamp(min=0.1)  # 1 ± 0.9, kept >= 0.1
    raise ValueError(f"unknown RandAugment op {name!r}")


# ----------------------------------------------------------------------------- PIL-like pixel ops
# Each takes x: float32 (b, 3, H, W) in [0, 255] and arg: float32 (b,) on x's device, and
# `q` = quantise like PIL's uint8 output; returns a new float32 tensor.
def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(degenerate, x, factor, q):
    # PIL Image.blend(degenerate, x, factor): degenerate + factor * (x - degenerate) in float32,
    # clipped, then truncated to uint8 by a C cast
    out = (degenerate + _per_image(factor) * (x - degenerate)).clamp_(0, 255)
    return out.floor_() if q else out


def _grey(x, q):
    # PIL convert("L"): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; exact in float32 for ints
    lum = (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471) / 65536  # (b, 1, H, W)
    return torch.floor(lum + 0.5) if q else lum


def _color(x, f, q):
    return _blend(_grey(x, q), x, f, q)  # ImageEnhance.Color: blend with the grey image


def _contrast(x, f, q):
    # ImageEnhance.Contrast: blend with a flat image at the grey mean, int(mean + 0.5)
    mean = _grey(x, q).mean(dim=(1, 2, 3), dtype=torch.float64)
    mean = torch.floor(mean + 0.5) if q else mean
    return _blend(_per_image(mean.float()), x, f, q)


def _brightness(x, f, q):
    # ImageEnhance.Brightness: blend with black, i.e. 0 + f * (x - 0)
    out = (_per_image(f) * x).clamp_(0, 255)
    return out.floor_() if q else out


def _sharpness(x, f, q):
    # ImageEnhance.Sharpness: blend with PIL's SMOOTH filter, kernel [[1,1,1],[1,5,1],[1,1,1]]/13
    # rounded to uint8, which leaves a 1-pixel border as is. Computed as (3x3 sum + 4 * centre)
    # / 13; a multiple of 1/13 is never a tie, so rounding agrees with PIL's float kernel sum.
    degenerate = x.clone()
    if min(x.shape[-2:]) > 2:
        rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]  # separable 3x3 box sum, exact for ints
        box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
        smooth = (box + 4 * x[:, :, 1:-1, 1:-1]) / 13
        degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5) if q else smooth
    return _blend(degenerate, x, f, q)


def _posterize(x, bits, q):
    # ImageOps.posterize: keep the top `bits` bits. bits <= 0 gives black (Pillow < 13's result;
    # Pillow 13 raises ValueError); bits >= 8 (a no-op in timm) keeps integer levels as they are
    step = _per_image(torch.exp2((8 - bits).clamp(0, 8)))  # 2 ** (8 - bits); 256 = all black
    return torch.floor(x / step).mul_(step)


def _solarize(x, thresh, q):
    return torch.where(x < _per_image(thresh), x, 255 - x)  # ImageOps.solarize


def _solarize_add(x, add, q):
    # timm solarize_add: pixels below 128 get `add`, capped at 255
    return torch.where(x < 128, (x + _per_image(add)).clamp_(max=255), x)


def _invert(x, arg, q):
    return 255 - x


def _histogram(x):
    """Per-channel 256-bin histograms of floor(x): (b, 3, 256) int64, and the bin index map."""
    b, c = x.shape[:2]
    index = x.reshape(b, c, -1).long().clamp_(0, 255)  # (b, 3, H*W); .long() floors x >= 0
    # why not bincount: on CUDA it reads the input's max back to the host (a sync per call)
    ones = torch.ones((), dtype=torch.int64, device=x.device).expand(index.shape)
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=x.device).scatter_add_(2, index, ones)
    return hist, index


def _apply_lut(x, lut, index):
    return torch.gather(lut.float(), 2, index).view_as(x)


def _equalize(x, arg, q):
    # ImageOps.equalize, per channel: step = (count - count of the highest grey level) // 255,
    # lut[i] = (step // 2 + #pixels below i) // step; identity if <= 1 level is used or step == 0
    hist, index = _histogram(x)
    used = hist > 0
    top = 255 - used.flip(-1).int().argmax(-1, keepdim=True)  # highest used level
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, top)) // 255
    below = hist.cumsum(-1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(0, 255)  # Pillow's point() clips
    keep = (used.sum(-1, keepdim=True) <= 1) | (step == 0)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    return _apply_lut(x, torch.where(keep, identity, lut), index)


def _auto_contrast(x, arg, q):
    # ImageOps.autocontrast (cutoff 0), per channel: lut[i] = int(i * scale + offset) in float64
    # with scale = 255 / (hi - lo), offset = -lo * scale; identity if hi <= lo
    hist, index = _histogram(x)
    used = hist > 0
    lo = used.int().argmax(-1, keepdim=True).double()
    hi = (255 - used.flip(-1).int().argmax(-1, keepdim=True)).double()
    # why tensor / tensor: torch computes scalar / tensor as scalar * reciprocal, 1 ulp off PIL
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = torch.trunc(levels * scale + (-lo * scale)).clamp_(0, 255)
    return _apply_lut(x, torch.where(hi <= lo, levels, lut), index)


_PIXEL_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _color, "ColorIncreasing": _color, "Contrast": _contrast,
    "ContrastIncreasing": _contrast, "Brightness": _brightness, "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness, "SharpnessIncreasing": _sharpness,
}
OP_NAMES = tuple(_PIXEL_OPS) + GEOMETRIC_OPS


# ----------------------------------------------------------------------------- geometry
def _pil_affine(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(b, 3, 3) float64 matrices in PIL's convention: output pixel centre (x+.5, y+.5) → input.

    Same matrices as timm's shear_x/shear_y/translate_*_rel (about the top-left corner) and
    PIL's Image.rotate (about (w/2, h/2), counter-clockwise for positive degrees).
    """
    m = torch.eye(3, dtype=torch.float64, device=arg.device).repeat(len(arg), 1, 1)
    if name == "ShearX":
        m[:, 0, 1] = arg
    elif name == "ShearY":
        m[:, 1, 0] = arg
    elif name == "TranslateXRel":
        m[:, 0, 2] = arg * w  # timm: pixels = pct * img.size[0]
    elif name == "TranslateYRel":
        m[:, 1, 2] = arg * h
    elif name == "Rotate":
        angle = -torch.deg2rad(torch.remainder(arg, 360.0))  # as Image.rotate: angle % 360 first
        cos, sin = torch.cos(angle).round(decimals=15), torch.sin(angle).round(decimals=15)
        cx, cy = w / 2, h / 2
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
        m[:, 0, 2] = cos * -cx + sin * -cy + cx
        m[:, 1, 2] = -sin * -cx + cos * -cy + cy
    else:
        raise ValueError(f"{name!r} is not a geometric op")
    return m


def _warp(x: torch.Tensor, pil_matrix: torch.Tensor, fill: torch.Tensor, q: bool) -> torch.Tensor:
    """Apply (b, 3, 3) PIL-convention affine maps with bilinear sampling, like PIL's transform.

    PIL samples with edge clamping but paints ``fill`` wherever the sample point itself falls
    outside the input, so: grid_sample with border padding, then fill by that mask.
    """
    b, _, h, w = x.shape
    # sample points in input pixel units, in float64 and PIL's order of operations (why: PIL
    # decides "outside" in double; a shift of exactly half the image, e.g. 0.405 * 300 px, must
    # fill the same edge row as PIL does)
    m = pil_matrix[:, :2].reshape(b, 6, 1, 1).to(x.device).unbind(1)
    xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w) + 0.5
    ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1) + 0.5
    u = torch.add(m[0] * xs, m[1] * ys).add_(m[2])  # (b, H, W)
    v = torch.add(m[3] * xs, m[4] * ys).add_(m[5])
    inside = u.ge(0).logical_and_(u < w).logical_and_(v >= 0).logical_and_(v < h)  # (b, H, W)
    grid = torch.empty(b, h, w, 2, device=x.device)  # grid_sample's [-1, 1] (align_corners=False)
    grid[..., 0] = u.mul_(2 / w).sub_(1)
    grid[..., 1] = v.mul_(2 / h).sub_(1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if q:
        # PIL truncates its bilinear result; float32 weights can sum to 1 - 1e-7, which would
        # truncate flat areas one level down, hence the small lift
        out = out.add_(1e-3).floor_()
    return torch.where(inside.unsqueeze(1), out, fill.view(1, 3, 1, 1))


# ----------------------------------------------------------------------------- the transform
def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"RandAugment expects a (B, 3, H, W) image tensor, got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"RandAugment expects uint8 or float images in [0, 255], got {images.dtype}")


def _layer_args(name: str, level: torch.Tensor, sign: torch.Tensor, translate_pct: float):
    """Op ``name``'s per-image argument for the whole batch, float32 (None for argument-free ops).

    Both paths compute arguments (and ``_layer_warp``'s matrices) on the whole batch and select
    afterwards (why: a CPU kernel may take its vectorised or its scalar code depending on an
    element's position, and Rotate's ``cos``/``sin`` could then move by an ulp on a subset).
    """
    arg = level_to_arg(name, level, sign, translate_pct)
    return None if arg is None else arg.float()


def _layer_warp(ops: tuple[str, ...], op: torch.Tensor, apply: torch.Tensor, level: torch.Tensor,
                sign: torch.Tensor, h: int, w: int, translate_pct: float):
    """The layer's geometric ops as one warp: ``(matrices (B, 3, 3) float64, selected (B,) bool)``,
    or None if ``ops`` has no geometric op. Rows of unselected images are meaningless."""
    warp_mat = warp_sel = None
    for k, name in enumerate(ops):
        if name in GEOMETRIC_OPS:
            sel = apply & (op == k)  # (B,) bool: this image runs op k in this layer
            mat = _pil_affine(name, level_to_arg(name, level, sign, translate_pct), h, w)
            warp_mat = mat if warp_mat is None else torch.where(sel.view(-1, 1, 1), mat, warp_mat)
            warp_sel = sel if warp_sel is None else warp_sel | sel
    return None if warp_mat is None else (warp_mat, warp_sel)


def _apply_layer_where(state: torch.Tensor, ops: tuple[str, ...], op: torch.Tensor,
                       apply: torch.Tensor, level: torch.Tensor, sign: torch.Tensor,
                       fill: torch.Tensor, q: bool, translate_pct: float) -> torch.Tensor:
    """One layer for CUDA: every pixel op of ``ops`` runs on the full batch and each image keeps
    its own op's result (``torch.where``); all geometric ops share one warp. About 15x the
    arithmetic of one op, but nothing is read back by the host. Returns a new tensor."""
    out = state
    for k, name in enumerate(ops):
        if name in GEOMETRIC_OPS:
            continue
        result = _PIXEL_OPS[name](state, _layer_args(name, level, sign, translate_pct), q)
        out = torch.where((apply & (op == k)).view(-1, 1, 1, 1), result, out)
    warp = _layer_warp(ops, op, apply, level, sign, *state.shape[-2:], translate_pct)
    if warp is not None:
        out = torch.where(warp[1].view(-1, 1, 1, 1), _warp(state, warp[0], fill, q), out)
    return out


def _apply_layer_grouped(state: torch.Tensor, ops: tuple[str, ...], op: torch.Tensor,
                         apply: torch.Tensor, level: torch.Tensor, sign: torch.Tensor,
                         fill: torch.Tensor, q: bool, translate_pct: float) -> torch.Tensor:
    """One layer for the CPU: per op, gather the images that drew it, run the op on them only and
    write them back (``state`` is updated in place and returned). Each image runs one op instead
    of all of them; finding the images is a ``nonzero``, which costs nothing extra on the CPU
    (on CUDA it would wait for the device). Same pixels as ``_apply_layer_where``, bit for bit."""
    chosen = torch.where(apply, op, -1)  # (B,) op index per image, -1 = layer skipped
    for k, name in enumerate(ops):
        if name in GEOMETRIC_OPS:
            continue
        idx = (chosen == k).nonzero().squeeze(1)
        if len(idx):
            arg = _layer_args(name, level, sign, translate_pct)
            state[idx] = _PIXEL_OPS[name](state[idx], None if arg is None else arg[idx], q)
    warp = _layer_warp(ops, op, apply, level, sign, *state.shape[-2:], translate_pct)
    if warp is not None:
        idx = warp[1].nonzero().squeeze(1)
        if len(idx):
            state[idx] = _warp(state[idx], warp[0][idx], fill, q)
    return state


def _apply_layer(state: torch.Tensor, ops: tuple[str, ...], op: torch.Tensor, apply: torch.Tensor,
                 level: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor, q: bool,
                 translate_pct: float, path: str) -> torch.Tensor:
    """One RandAugment layer: ``path`` "where" (no host sync, for CUDA) or "grouped" (the CPU).

    ``state``: float32 (B, 3, H, W) in [0, 255], contiguous, owned by the caller (the grouped
    path writes it); ``op`` (B,) int64 indices into ``ops``, ``apply`` (B,) bool, ``level`` and
    ``sign`` (B,) float64, all on ``state``'s device. ``q``: quantise every op's output like
    PIL's uint8 images. Both paths give bit-identical pixels (tests/test_randaugment.py).
    """
    layer = _apply_layer_grouped if path == "grouped" else _apply_layer_where
    return layer(state, ops, op, apply, level, sign, fill, q, translate_pct)


def _choose_path(device: torch.device, path: str | None) -> str:
    """"grouped" on the CPU (no host/device sync to avoid, ~11x faster), else "where"."""
    if path is None:
        return "grouped" if device.type == "cpu" else "where"
    if path not in ("grouped", "where"):
        raise ValueError(f"RandAugment path must be 'grouped' or 'where', got {path!r}")
    return path


def _start(images: torch.Tensor) -> torch.Tensor:
    # a new contiguous float32 copy: the input is never written (ffcv reuses its buffers)
    return images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _finish(state: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    # back to the input's memory format (e.g. channels_last); empty_like preserves it
    return state if images.is_contiguous() else torch.empty_like(images).copy_(state)


def apply_op(images: torch.Tensor, name: str, magnitude: float, *, negate: bool = False,
             fill=(124, 116, 104), translate_pct: float = 0.45,
             _path: str | None = None) -> torch.Tensor:
    """Apply one named timm RandAugment op at a fixed magnitude to every image (for tests/demos).

    ``negate`` picks the negative branch of timm's random sign (signed ops only). Runs the
    same code as ``BatchRandAugment`` with every image drawing this op (``_path``: as there).
    """
    _check_images(images)
    if name not in OP_NAMES:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(OP_NAMES)}")
    b, dev = images.shape[0], images.device
    level = torch.full((b,), float(magnitude), dtype=torch.float64, device=dev)
    sign = torch.full((b,), -1.0 if negate else 1.0, dtype=torch.float64, device=dev)
    op = torch.zeros(b, dtype=torch.int64, device=dev)
    apply = torch.ones(b, dtype=torch.bool, device=dev)
    fill_t = torch.tensor(fill, dtype=torch.float32, device=dev)
    state = _apply_layer(_start(images), (name,), op, apply, level, sign, fill_t,
                         images.dtype == torch.uint8, translate_pct, _choose_path(dev, _path))
    return _finish(state.to(images.dtype), images)


class BatchRandAugment:
    """timm RandAugment (``rand-m9-mstd0.5-inc1`` …) applied to a whole (B, 3, H, W) batch.

    Each image draws its own ``n`` ops, apply coins, magnitudes and signs from the
    ``torch.Generator`` passed in, which must live on the batch's device: every draw is made
    there, and no draw is ever read back by the host (no sync, no host↔device copy per batch;
    the constant tables are built once per device). The caller seeds the generator (the trainer:
    ``seeding.derive(seed, epoch, step)``), so a batch's augmentation is a pure function of its
    seed. CPU and CUDA generators give different streams: the same seed draws different ops on
    different devices, while each op computes the same pixels (tests/test_randaugment.py).

    On CUDA, per layer, every op of the set runs on the full batch and each image keeps its own
    op's result: about 15x the arithmetic of one op, but no sync. On the CPU, each op runs only
    on the images that drew it (same pixels; see the module docstring).

    ``fill`` is the colour of pixels uncovered by Rotate/Shear/Translate, 0..255 per channel
    (timm: the dataset mean; ImageNet's is (124, 116, 104)). ``translate_pct``: timm's 0.45.
    See the module docstring for where this differs from timm's PIL implementation.
    """

    def __init__(self, spec: str, fill=(124, 116, 104), translate_pct: float = 0.45):
        cfg = parse_spec(spec)
        self.spec = spec
        self.ops: tuple[str, ...] = cfg["ops"]
        self.weights = cfg["weights"]  # None (uniform) or one weight per op
        self.n: int = cfg["n"]
        self.magnitude: float = cfg["magnitude"]
        self.magnitude_std: float = cfg["magnitude_std"]
        self.magnitude_max = cfg["magnitude_max"]
        self.prob: float = cfg["prob"]
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            raise ValueError(f"fill must be 3 values in 0..255, got {fill!r}")
        self.fill = tuple(float(v) for v in fill)
        self.translate_pct = float(translate_pct)
        self._constants: dict[torch.device, tuple] = {}  # device -> (fill, weights) tensors

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fill (3,) float32, weights (K,) float64 or None) on ``device``, built once per device
        (why: ``torch.tensor(list, device=cuda)`` per batch is a blocking pageable copy)."""
        consts = self._constants.get(device)
        if consts is None:  # a race between two threads only builds the same tensors twice
            fill = torch.tensor(self.fill, dtype=torch.float32, device=device)
            weights = None if self.weights is None else \
                torch.tensor(self.weights, dtype=torch.float64, device=device)
            consts = self._constants[device] = (fill, weights)
        return consts

    def sample(self, batch_size: int, generator: torch.Generator):
        """Draw every image's choices on ``generator``'s device: ``op`` (B, n) int64 indices into
        ``self.ops``, ``apply`` (B, n) bool, ``level`` (B, n) float64 clipped magnitudes and
        ``sign`` (B, n) ±1 float64."""
        if not isinstance(generator, torch.Generator):
            raise TypeError("BatchRandAugment needs a seeded torch.Generator on the batch's "
                            f"device (never the global RNG), got {type(generator).__name__}")
        g, dev, shape = generator, generator.device, (batch_size, self.n)
        f64 = dict(generator=g, dtype=torch.float64, device=dev)
        weights = self._on(dev)[1]
        if weights is None:
            op = torch.randint(len(self.ops), shape, generator=g, device=dev)  # with replacement
        else:
            # timm: np.random.choice(replace=False, p=weights). Same distribution, no sync: the n
            # largest of weight / Exp(1) keys (Efraimidis-Spirakis). torch.multinomial would
            # check its weights on the host. Zero weights get key -1 and are never chosen.
            clocks = torch.empty(batch_size, len(self.ops), dtype=torch.float64, device=dev)
            keys = weights / clocks.exponential_(generator=g)
            op = torch.where(weights > 0, keys, -1.0).topk(self.n, dim=1).indices
        apply = torch.rand(shape, **f64) < self.prob
        if self.magnitude_std == math.inf:  # timm: uniform(0, m)
            level = torch.rand(shape, **f64) * self.magnitude
        elif self.magnitude_std > 0:  # timm: gauss(m, mstd)
            level = self.magnitude + self.magnitude_std * torch.randn(shape, **f64)
        else:
            level = torch.full(shape, self.magnitude, dtype=torch.float64, device=dev)
        level = level.clamp(0.0, self.magnitude_max or _LEVEL_DENOM)  # timm's upper bound
        sign = torch.where(torch.rand(shape, **f64) > 0.5, -1.0, 1.0)
        return op, apply, level, sign

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *,
                 _path: str | None = None) -> torch.Tensor:
        """Augment ``images`` (uint8 or float in [0, 255], (B, 3, H, W), any device and memory
        format) with draws from ``generator`` (on the same device); returns a new tensor of the
        same dtype, shape and memory format. The input is never written.

        ``_path`` (tests only) forces "grouped" or "where"; by default the CPU groups images by
        op and other devices use the sync-free where path. Both give the same pixels."""
        _check_images(images)
        path = _choose_path(images.device, _path)
        if isinstance(generator, torch.Generator) and \
                generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on "
                             f"{images.device}: draws must be made on the batch's device")
        b = images.shape[0]
        op, apply, level, sign = self.sample(b, generator)
        if b == 0 or self.n == 0:
            return images.clone()
        fill = self._on(images.device)[0]
        state = _start(images)  # (B, 3, H, W) contiguous float32 copy
        for layer in range(self.n):
            state = _apply_layer(state, self.ops, op[:, layer], apply[:, layer], level[:, layer],
                                 sign[:, layer], fill, images.dtype == torch.uint8,
                                 self.translate_pct, path)
        return _finish(state.to(images.dtype), images)

    def __repr__(self) -> str:
        return (f"BatchRandAugment({self.spec!r}: n={self.n}, m={self.magnitude}, "
                f"mstd={self.magnitude_std}, mmax={self.magnitude_max}, p={self.prob}, "
                f"ops={len(self.ops)}{', weighted' if self.weights is not None else ''})")
