"""The environment section of the GPU check: prints (and appends to --out) one JSON line.

    python3 scripts/gpu_env_probe.py --bundle DIR --site T [--device cuda|cpu] [--out FILE]

With --out, the JSON line is appended to FILE and a one-line summary printed; without, the line.

Run by scripts/gpu_check.sh after it installed DIR's wheels into T and put T first on PYTHONPATH.
Stdlib only at the top: every third-party import is tried in its own step, so one that fails is
reported (with its error) instead of stopping the probe. "ok" is true when:
  * each wheel in DIR matches manifest.json's sha256;
  * ffcv (with its compiled libffcv), fastargs and fastvit_reduce import, from T;
  * timm imports from T at the manifest's version (the box's own timm may be older), and has
    what fastvit_reduce/ema.py calls (ModelEmaV3._foreach_lerp_ and _lerp_, new in 1.0.31);
  * numba's threading layer, after a parallel=True function ran, is one that is safe when two
    Python threads launch parallel kernels at once (omp or tbb, never workqueue), and two threads
    doing exactly that finish;
  * --device cuda: torch sees a GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

SAFE_LAYERS = ("omp", "tbb")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="the folder of wheels (with manifest.json)")
    ap.add_argument("--site", required=True, help="the folder the wheels were installed into")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", help="append the JSON line to this file (and print a summary)")
    args = ap.parse_args()
    t0 = time.time()
    site = Path(args.site).resolve()
    rec: dict = {"section": "environment", "ok": False, "device": args.device,
                 "python": platform.python_version(), "executable": sys.executable,
                 "glibc": "-".join(platform.libc_ver()), "site": str(site)}
    errors: list[str] = []

    def step(name, fn):
        try:
            return fn()
        except BaseException as e:  # noqa: BLE001 — report it, go on
            errors.append(f"{name}: {type(e).__name__}: {e}")
            rec.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=4)[-1500:]
            return None

    def carried(module) -> bool:
        return Path(module.__file__).resolve().is_relative_to(site)

    # --- the bundle: every wheel as the manifest says
    manifest = step("manifest", lambda: json.loads((Path(args.bundle) / "manifest.json").read_text()))
    want = {w["name"]: w for w in (manifest or {}).get("wheels", [])}
    if manifest:
        rec["bundle_commit"] = manifest.get("commit"), manifest.get("dirty")
        for w in want.values():
            p = Path(args.bundle) / w["file"]
            if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != w["sha256"]:
                errors.append(f"bundle: {w['file']} missing or not the manifest's (sha256)")

    # --- the box's own packages
    def torch_info():
        import torch
        rec["torch"] = torch.__version__
        rec["torch_cuda"] = torch.version.cuda
        rec["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if args.device == "cuda" and rec["gpu"] is None:
            raise RuntimeError("torch sees no GPU")
    step("torch", torch_info)
    for mod in ("numpy", "cv2", "llvmlite"):  # ffcv needs all three
        def version(mod=mod):
            rec[mod] = __import__(mod).__version__
        step(mod, version)
    try:  # information only, as is distutils
        rec["setuptools"] = __import__("setuptools").__version__
    except Exception as e:  # noqa: BLE001 — e.g. SETUPTOOLS_USE_DISTUTILS=stdlib on 3.12
        rec["setuptools"] = f"not importable ({type(e).__name__}: {e})"
    try:  # information only: ffcv's `from distutils.log import warn` is what must work (below)
        rec["distutils"] = __import__("distutils").__file__
    except ImportError as e:
        rec["distutils"] = f"missing ({e})"

    # --- numba: the layer that actually runs, and two threads launching parallel kernels at once
    def numba_info():
        import numba
        import numpy as np
        rec["numba"] = numba.__version__
        rec["numba_threading_layer_env"] = os.environ.get("NUMBA_THREADING_LAYER")
        rec["numba_num_threads"] = numba.config.NUMBA_NUM_THREADS

        @numba.njit(parallel=True, nogil=True)
        def kernel(a):
            s = np.zeros(a.size)
            for i in numba.prange(a.size):
                s[i] = np.sqrt(a[i])
            return s.sum()

        a = np.ones(10_000)
        kernel(a)
        rec["numba_threading_layer"] = layer = numba.threading_layer()
        if layer not in SAFE_LAYERS:  # workqueue aborts the process on a concurrent launch: stop here
            raise RuntimeError(f"threading layer {layer!r} is not thread-safe; set NUMBA_THREADING_LAYER=omp")
        fails: list[str] = []

        def work():
            try:
                for _ in range(50):
                    kernel(a)
            except Exception as e:  # noqa: BLE001
                fails.append(repr(e))
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if fails or any(t.is_alive() for t in threads):
            raise RuntimeError(f"two threads launching parallel kernels: {fails or 'hung'}")
        rec["numba_two_threads"] = "ok"
        return True
    step("numba", numba_info)

    # --- what the bundle carries
    def carried_import(name, *more):
        """Import ``name`` (and ``more``) and require it to come from the bundle."""
        module = importlib.import_module(name)
        for extra in more:
            importlib.import_module(extra)
        rec[f"{name}_file"] = module.__file__
        if not carried(module):
            raise RuntimeError(f"{name} imported from {module.__file__}, not from the bundle")
        return module

    def ffcv_info():
        try:  # the project's way in: every module of ours that uses ffcv imports this first
            importlib.import_module("fastvit_reduce.data.ffcv_patch")
        except Exception:  # noqa: BLE001, S110 — reported by the fastvit_reduce step below
            pass
        # the compiled part (with its grafted OpenCV/turbojpeg), and graph's `from distutils.log import warn`
        return carried_import("ffcv", "ffcv._libffcv", "ffcv.pipeline.graph") is not None
    rec["ffcv_ok"] = step("ffcv", ffcv_info) is True
    rec["fastargs_ok"] = step("fastargs", lambda: carried_import("fastargs") is not None) is True

    def timm_info():
        timm = carried_import("timm")
        from timm.utils import ModelEmaV3
        rec["timm"] = timm.__version__
        expected = want.get("timm", {}).get("version")
        if expected and timm.__version__ != expected:
            raise RuntimeError(f"timm {timm.__version__} imported, the bundle carries {expected}")
        lacks = [m for m in ("_foreach_lerp_", "_lerp_") if not hasattr(ModelEmaV3, m)]
        if lacks:  # both new in timm 1.0.31
            raise RuntimeError(f"timm.utils.ModelEmaV3 has no {lacks} (fastvit_reduce/ema.py calls them)")
        return True
    rec["timm_ok"] = step("timm", timm_info) is True
    # the numba internals data.jit imports, ffcv's loader as the trainer imports it, the EMA
    rec["fastvit_reduce_ok"] = step("fastvit_reduce", lambda: carried_import(
        "fastvit_reduce", "fastvit_reduce.data.jit", "fastvit_reduce.data.loaders", "fastvit_reduce.ema") is not None) is True

    rec["errors"] = errors
    rec["ok"] = not errors
    rec["wall_s"] = round(time.time() - t0, 2)
    line = json.dumps(rec)
    if args.out:  # the line to the file, a summary to the console
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
        print(f"gpu_check: environment {'ok' if rec['ok'] else 'FAILED'} | python {rec['python']}, "
              f"torch {rec.get('torch')}, timm {rec.get('timm')}, numba {rec.get('numba')} "
              f"(layer {rec.get('numba_threading_layer')}), gpu {rec.get('gpu')}"
              + "".join(f"\n  {e}" for e in errors), flush=True)
    else:
        print(line, flush=True)
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
