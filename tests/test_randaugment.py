"""fastvit_reduce.augment.randaugment: BatchRandAugment against timm's PIL RandAugment, op by op, on real photos.

Agreement with timm 1.0.31 + Pillow 13 (mean absolute difference in grey levels per pixel and
channel, scikit-image's astronaut / coffee / chelsea at half size, magnitude 9 and 4.7, both
signs; uint8 input):

* every colour/histogram op (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd,
  Color, Contrast, Brightness, Sharpness and their ``Increasing`` variants) is pixel-exact:
  measured 0.0, asserted <= 0.01 and max |diff| == 0;
* Rotate, ShearX/Y, TranslateX/YRel match PIL's BILINEAR resampling to rounding: measured
  <= 0.08 (float32 vs PIL's float64 interpolation weights flip a truncation now and then),
  asserted <= 0.1 and max |diff| <= 1. timm picks BILINEAR or BICUBIC at random; we always
  use bilinear, which differs from PIL's BICUBIC by 0.4–1.3 grey levels on these photos.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import timm.data.auto_augment as taa
from PIL import Image

from fastvit_reduce.augment.randaugment import (GEOMETRIC_OPS, OP_NAMES, SIGNED_OPS,
                                                BatchRandAugment, apply_op, parse_spec)

FILL = (124, 116, 104)  # timm's img_mean for ImageNet's mean, as create_transform passes it
TOLERANCE = {name: (0.1, 1) if name in GEOMETRIC_OPS else (0.01, 0) for name in OP_NAMES}  # (MAD, max)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for small tensors


@pytest.fixture(scope="module")
def photos():
    """Three real photos shipped inside scikit-image (no download), halved for speed."""
    skdata = pytest.importorskip("skimage.data")
    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = Image.fromarray(getattr(skdata, name)())
        out.append(np.asarray(img.reduce(2)))  # (H, W, 3) uint8, non-square for coffee/chelsea
    return out


def timm_op(photo: np.ndarray, name: str, magnitude: float, negate: bool) -> np.ndarray:
    """timm's own PIL op at a fixed magnitude and sign, with BILINEAR resampling and our fill."""
    hparams = dict(translate_const=100, img_mean=FILL, interpolation=Image.BILINEAR)
    # timm negates when random.random() > 0.5
    with mock.patch.object(taa.random, "random", return_value=1.0 if negate else 0.0):
        level_fn = taa.LEVEL_TO_ARG[name]
        args = level_fn(magnitude, hparams) if level_fn else ()
        out = taa.NAME_TO_OP[name](Image.fromarray(photo), *args, fillcolor=FILL,
                                   resample=Image.BILINEAR)
    return np.asarray(out)


def to_batch(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(photo.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)


CASES = [(name, m, neg) for name in OP_NAMES for m in (9.0, 4.7)
         for neg in ((False, True) if name in SIGNED_OPS else (False,))]


@pytest.mark.parametrize("name,magnitude,negate", CASES)
def test_op_matches_timm_pil(photos, name, magnitude, negate):
    mad_tol, max_tol = TOLERANCE[name]
    for photo in photos:
        ref = timm_op(photo, name, magnitude, negate).astype(np.int32)
        ours = apply_op(to_batch(photo), name, magnitude, negate=negate, fill=FILL)
        diff = np.abs(ours[0].permute(1, 2, 0).numpy().astype(np.int32) - ref)
        assert diff.mean() <= mad_tol and diff.max() <= max_tol, \
            f"{name} m={magnitude} negate={negate} {photo.shape}: MAD {diff.mean():.4f}, max {diff.max()}"


def test_posterize_zero_bits_is_black_and_never_raises(photos):
    """inc1 at magnitude 10 asks for 0 bits: Pillow 13 raises, timm's old meaning is black."""
    x = to_batch(photos[0])
    assert apply_op(x, "PosterizeIncreasing", 10).eq(0).all()
    assert apply_op(x, "PosterizeIncreasing", 15).eq(0).all()  # mmax > 10: negative bits
    assert apply_op(x, "Posterize", 1.0).eq(0).all()  # non-increasing: int(0.4) = 0 bits
    assert torch.equal(apply_op(x, "Posterize", 20), x)  # >= 8 bits: unchanged, as in timm
    # the whole policy at the top magnitude, always applied: must run through
    aug = BatchRandAugment("rand-m10-n3-p1.0-mstd0.5-inc1", fill=FILL)
    out = aug(x.expand(32, -1, -1, -1), torch.Generator().manual_seed(0))
    assert out.shape == (32, *x.shape[1:]) and out.dtype == torch.uint8


def test_parse_spec_follows_timm():
    s = parse_spec("rand-m9-mstd0.5-inc1")
    assert (s["magnitude"], s["n"], s["prob"], s["magnitude_std"], s["magnitude_max"]) == \
        (9.0, 2, 0.5, 0.5, None)
    assert s["ops"] == tuple(taa._RAND_INCREASING_TRANSFORMS) and s["weights"] is None
    s = parse_spec("rand-m9-n3-mstd0.5")
    assert s["n"] == 3 and s["ops"] == tuple(taa._RAND_TRANSFORMS)
    assert parse_spec("rand-m7-mmax10")["magnitude_max"] == 10
    assert parse_spec("rand-m9-mstd101")["magnitude_std"] == float("inf")  # timm: uniform
    assert parse_spec("rand-mstd1-mstd2")["magnitude_std"] == 1.0  # timm: setdefault
    assert parse_spec("rand")["magnitude"] == 10.0 and parse_spec("rand-p0.3")["prob"] == 0.3
    s = parse_spec("rand-m9-tweights")
    assert dict(zip(s["ops"], s["weights"])) == taa._RAND_WEIGHTED_0
    assert len(parse_spec("rand-m9-w0")["weights"]) == 15
    for bad, words in [("", "empty"), ("augmix-m5", "start with"), ("rand-m9-foo", "'foo'"),
                       ("rand-mx", "'mx'"), ("rand-m9-t3a", "'3a'"), ("rand-w1", "w0"),
                       ("rand-p1.5", "p must"), ("rand-n16-tweights", "n must"), ("rand-n14-w0", "n must")]:
        with pytest.raises(ValueError, match=words):
            parse_spec(bad)


def test_sampling_follows_timm():
    aug = BatchRandAugment("rand-m9-n3-mstd0.5")
    op, apply, level, sign = aug.sample(4000, torch.Generator().manual_seed(0))
    assert op.shape == apply.shape == level.shape == sign.shape == (4000, 3)
    assert abs(apply.double().mean().item() - 0.5) < 0.02 and set(sign.unique().tolist()) == {-1, 1}
    assert level.max() <= 10 and abs(level.mean().item() - 9.0) < 0.05  # N(9, 0.5) clipped at 10
    assert torch.bincount(op.view(-1), minlength=15).min() > 600  # uniform over 15 ops
    level = BatchRandAugment("rand-m15-mmax12-mstd0").sample(10, torch.Generator())[2]
    assert level.eq(12).all()
    level = BatchRandAugment("rand-m8-mstd200").sample(4000, torch.Generator().manual_seed(0))[2]
    assert level.min() >= 0 and level.max() <= 8 and abs(level.mean().item() - 4) < 0.2
    # weighted sets draw without replacement; w0 gives Posterize and Invert weight 0
    aug = BatchRandAugment("rand-m9-n3-w0")
    op = aug.sample(2000, torch.Generator().manual_seed(0))[0]
    assert all(len(set(row)) == 3 for row in op.tolist())
    assert not torch.isin(op, torch.tensor([aug.ops.index("Posterize"), aug.ops.index("Invert")])).any()


def test_batch_equals_the_same_ops_image_by_image(photos):
    """Grouping images by op must give exactly what applying each image's draws in turn gives."""
    x = torch.from_numpy(np.stack([p[:96, :128] for p in photos] * 4)).permute(0, 3, 1, 2)
    aug = BatchRandAugment("rand-m9-n3-mstd0.5-inc1", fill=FILL)
    out = aug(x, torch.Generator().manual_seed(3))
    op, apply, level, sign = aug.sample(len(x), torch.Generator().manual_seed(3))
    assert apply.sum() >= len(x) and not apply.all()  # both applied and skipped layers occur
    for i in range(len(x)):
        img = x[i:i + 1]
        for layer in range(aug.n):
            if apply[i, layer]:
                img = apply_op(img, aug.ops[op[i, layer]], level[i, layer].item(),
                               negate=bool(sign[i, layer] < 0), fill=FILL)
        assert torch.equal(out[i:i + 1], img), f"image {i}"


def test_determinism_dtype_device_layout(photos):
    x = torch.from_numpy(np.stack([p[:64, :80] for p in photos] * 3)).permute(0, 3, 1, 2)
    aug = BatchRandAugment("rand-m9-mstd0.5-inc1")
    a = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(2)))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    cl = x.contiguous(memory_format=torch.channels_last)
    b = aug(cl, torch.Generator().manual_seed(1))
    assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)
    f = aug(x.float(), torch.Generator().manual_seed(1))  # float in [0, 255]: no quantisation
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 255
    assert (f - a.float()).abs().mean() < 1.0
    assert torch.equal(BatchRandAugment("rand-n0")(x, torch.Generator()), x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(x[0], torch.Generator())
    with pytest.raises(ValueError, match="uint8 or float"):
        aug(x.long(), torch.Generator())
    with pytest.raises(TypeError, match="seeded torch.Generator"):
        aug(x, None)  # never torch's global RNG


# aten ops that make the host wait for the device (or copy host data to it) when run on CUDA:
# .item()/.tolist(), nonzero and boolean-mask indexing (output size read back), bincount and
# multinomial (check their input on the host), torch.tensor(list) (a pageable copy).
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "bincount", "multinomial",
               "unique", "lift_fresh", "repeat_interleave", "is_nonzero", "equal")


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        if func.overloadpacket.__name__ == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.names.append("index with a bool mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m9-n3-tweights", "rand-m9-mstd101"])
def test_no_host_sync_ops(photos, spec):
    """The CPU stand-in for CUDA's sync counter: record every aten op of a call and check that
    none of them would read a device value back on the host or upload host data."""
    x = torch.from_numpy(np.stack([p[:32, :40] for p in photos] * 2)).permute(0, 3, 1, 2)
    aug = BatchRandAugment(spec)
    aug(x, torch.Generator().manual_seed(0), _path="where")  # build the per-device constants first
    with _RecordOps() as rec:
        aug(x, torch.Generator().manual_seed(1), _path="where")  # CUDA's path, forced on the CPU
    bad = sorted({n for n in rec.names if n in SYNCING_OPS or n.startswith("index with")})
    assert len(rec.names) > 100 and not bad, bad


def test_cpu_default_is_the_grouped_path(photos):
    """On the CPU, images are grouped by op: a call runs ``nonzero`` (which the where path never
    does), i.e. the ~11x cheaper path is the one the trainer gets."""
    x = torch.from_numpy(np.stack([p[:32, :40] for p in photos] * 2)).permute(0, 3, 1, 2)
    with _RecordOps() as rec:
        BatchRandAugment("rand-m9-mstd0.5-inc1")(x, torch.Generator().manual_seed(1))
    assert "nonzero" in rec.names


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m9-n3-mstd0.5", "rand-m9-mstd101",
                                  "rand-m7-mmax10-n3-inc1", "rand-m9-n3-tweights", "rand-m9-w0",
                                  "rand-m10-mstd1-p1-inc1"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_grouped_and_where_paths_are_bit_identical(photos, spec, dtype):
    """The CPU's grouped path and CUDA's where path apply one set of draws; over many seeds they
    must give the same pixels, bit for bit (uint8 and unquantised float input)."""
    x = torch.from_numpy(np.stack([p[:40, :56] for p in photos] * 4)).permute(0, 3, 1, 2)
    x = x if dtype == torch.uint8 else x * (254 / 255)  # float: off the integer grey levels
    aug = BatchRandAugment(spec, fill=FILL)
    for seed in range(12):
        grouped = aug(x, torch.Generator().manual_seed(seed), _path="grouped")
        where = aug(x, torch.Generator().manual_seed(seed), _path="where")
        assert grouped.dtype == dtype and torch.equal(grouped, where), (spec, seed)
    with pytest.raises(ValueError, match="grouped"):
        aug(x, torch.Generator(), _path="gathered")


@pytest.mark.parametrize("name", OP_NAMES)
def test_apply_op_paths_agree(photos, name):
    x = torch.from_numpy(np.stack([p[:48, :64] for p in photos])).permute(0, 3, 1, 2)
    for negate in (False, True):
        assert torch.equal(apply_op(x, name, 7.3, negate=negate, fill=FILL, _path="grouped"),
                           apply_op(x, name, 7.3, negate=negate, fill=FILL, _path="where"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", OP_NAMES)
def test_cuda_op_matches_cpu(photos, name):
    """Op by op, CUDA computes what the CPU computes: colour/histogram ops exactly, geometry to
    one grey level (CUDA's grid_sample weights round differently). Why op by op: comparing whole
    policies is flaky by construction, a 1-level difference before Solarize, Posterize or
    Equalize can become 255. The draws themselves come from each device's own generator."""
    x = torch.from_numpy(np.stack([p[:64, :80] for p in photos])).permute(0, 3, 1, 2)
    for negate in (False, True):
        cpu = apply_op(x, name, 7.3, negate=negate, fill=FILL)
        cuda = apply_op(x.cuda().contiguous(memory_format=torch.channels_last), name, 7.3,
                        negate=negate, fill=FILL)
        assert cuda.is_cuda and cuda.dtype == torch.uint8
        diff = (cuda.cpu().int() - cpu.int()).abs()
        mad_tol, max_tol = TOLERANCE[name]
        assert diff.float().mean() <= mad_tol and diff.max() <= max_tol, (name, negate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_policy_draws_on_device_without_syncs(photos):
    x = torch.from_numpy(np.stack([p[:64, :80] for p in photos] * 4)).permute(0, 3, 1, 2).cuda()
    aug = BatchRandAugment("rand-m9-n3-mstd0.5-inc1")
    a = aug(x, torch.Generator("cuda").manual_seed(5))  # warm-up builds the constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = aug(x, torch.Generator("cuda").manual_seed(5))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a, b)
