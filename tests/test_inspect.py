"""fastvit_reduce.data.inspect (``fastvit-reduce inspect``): what a .beton holds, broken side files
reported, ``--deep`` decodes every JPEG."""
from __future__ import annotations

from pathlib import Path

from fastvit_reduce.data import inspect as inspect_cmd
from fastvit_reduce.data.betons import verify_beton


def _zero(path: str, start: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(length))


def test_inspect_deep_lists_the_jpegs_that_do_not_decode(tiny_beton, capsys):
    """Damage inside one JPEG's compressed data keeps its markers and headers (the structure is
    fine); only decoding finds it."""
    from conftest import corrupt_jpeg
    from fastvit_reduce.data import inspect as inspect_cmd
    path = tiny_beton(n=20, num_classes=4, write_mode="jpg")
    corrupt_jpeg(path, 7)
    assert verify_beton(path) == 20
    assert inspect_cmd.deep_check(path) == [7]
    capsys.readouterr()
    assert inspect_cmd.main([path, "--deep"]) == 1
    assert "1 image(s) fail to decode: 7" in capsys.readouterr().err
    healthy = tiny_beton("ok.beton", n=20, num_classes=4, write_mode="jpg")
    assert inspect_cmd.main([healthy, "--deep"]) == 0
    assert "samples: 20" in capsys.readouterr().out


def test_inspect_reports_broken_side_files_instead_of_failing(tiny_beton, capsys):
    path = tiny_beton("data.beton", n=8, num_classes=2, size=16)
    Path(f"{path}.classes.json").write_text('["a", "b"')  # torn by a crash
    Path(f"{path}.report.json").write_text("{")
    assert inspect_cmd.main([path]) == 0
    shown = capsys.readouterr().out
    assert "samples: 8" in shown and "classes: 2 (no .classes.json)" in shown
    assert f"PROBLEM: {path}.classes.json: not valid JSON" in shown
    assert f"PROBLEM: {path}.report.json: not valid JSON" in shown
    assert inspect_cmd.main([path, "--bogus"]) == 2 and "usage" in capsys.readouterr().err
