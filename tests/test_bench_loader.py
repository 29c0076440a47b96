"""fastvit_reduce.bench.loader (``fastvit-reduce bench loader``): its Posterize guard and table.
Its ceiling pool of worker processes: tests/e2e/test_bench.py."""
from __future__ import annotations

import types


def test_bench_posterize_guard_and_table(tmp_path):
    from PIL import Image

    from fastvit_reduce.bench import loader as bench

    ra = bench.timm_randaugment("rand-m10-n2-inc1", 32)
    posterize = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0),) * 3  # Pillow < 13: black, no raise
    assert posterize.aug_fn(image, 8) is image
    result = dict(torchvision_img_s=100.0, ffcv_img_s=400.0, torchvision_randaug_img_s=80.0,
                  ffcv_randaug_img_s=None, ceiling_img_s=500.0, images=10, res=32, workers=2)
    args = types.SimpleNamespace(batch_size=4, max_res=64, epochs=1, randaug="rand-m9")
    text = bench.table(result, args, "header")
    assert "4.00x" in text and "0.80x" in text and "n/a" in text
    assert bench.main(["--data", str(tmp_path / "missing")]) == 2
