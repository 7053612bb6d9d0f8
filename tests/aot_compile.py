"""Compile every kernel, in the specializations a GPU launch uses, ahead of time for an NVIDIA target
(Triton -> TTIR -> TTGIR -> LLVM -> PTX -> cubin with the wheel's ptxas), without a GPU.

The interpreter accepts programs the GPU compiler rejects (bf16 ``tl.dot``, block shapes, dtype
rules); this catches those on a machine with no GPU. It checks that the code compiles, not what it
computes. Run without ``TRITON_INTERPRET``: ``python tests/aot_compile.py [--arch 90]``; prints one
line per specialization and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from causalscan.kernels.attribute import attribute_fwd_kernel  # noqa: E402
from causalscan.kernels.perturb import OPS, perturb_fwd_kernel  # noqa: E402
from causalscan.kernels.qk_fix import qk_fix_keys_kernel, qk_fix_rows_kernel  # noqa: E402


def compile_one(kernel, pointers: dict[str, str], consts: dict, arch: int, floats=()):
    """``pointers``: parameter -> element type (``bf16``, ``fp32``, ...); other parameters are i64
    (or fp32 when named in ``floats``), and constexprs come from ``consts``."""
    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    sig = {}
    for name, prm in params.items():
        if "constexpr" in str(prm.annotation):
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i64"
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def cases():
    dt = "bf16"
    p = {n: dt for n in ("y_ptr", "x_ptr", "src_ptr", "vec_ptr", "alpha_ptr", "dir_ptr")} | {"mask_ptr": "u8"}
    for op, has_dir, bd, br in (
        ("patch", False, 64, 32),
        ("add", False, 1024, 2),
        ("zero", False, 1, 2048),
        ("scale", True, 64, 32),
        ("project_out", True, 1024, 2),
        ("clamp", False, 64, 32),
    ):
        yield (
            f"perturb/{op}{'+dir' if has_dir else ''}/BR{br}-BD{bd}",
            perturb_fwd_kernel,
            p,
            dict(OP=OPS.index(op), HAS_ALPHA=op in ("add", "scale", "clamp"), HAS_DIR=has_dir, BR=br, BD=bd),
            (),
        )
    a = {"out_ptr": "fp32", "base_ptr": dt, "other_ptr": dt, "grad_ptr": dt}
    for by_pos, bt, br, bd, abs_, acc in (
        (True, 1, 32, 64, False, False),
        (False, 1, 2048, 1, True, True),
        (False, 2, 1, 256, False, False),
        (True, 16, 128, 1, True, True),
    ):
        yield (
            f"attribute/{'by_pos' if by_pos else 'all_pos'}/BT{bt}-BR{br}-BD{bd}",
            attribute_fwd_kernel,
            a,
            dict(HAS_BASE=not by_pos, BY_POS=by_pos, ABS=abs_, ACCUM=acc, BT=bt, BR=br, BD=bd),
            (),
        )
    for dtype, f32, softcap, block in ((dt, False, True, 64), ("fp16", False, False, 64), ("fp32", True, False, 32)):
        rows = {
            n: "fp32" for n in ("iq_ptr", "iall_ptr", "mx_ptr", "lrest_ptr", "grest_ptr", "srow_ptr", "bias_ptr")
        } | {"top_ptr": "i64"}
        rows |= {n: dtype for n in ("q_ptr", "k_ptr", "v_ptr", "dz_ptr", "qo_ptr", "ko_ptr")}
        common = dict(SOFTCAP=softcap, F32_DOT=f32, BT=block, BS=block, BDH=64)
        tag = f"{dtype}{'/softcap' if softcap else ''}/B{block}"
        yield (
            f"qk_fix_rows/{tag}",
            qk_fix_rows_kernel,
            rows,
            dict(HAS_Q=True, HAS_K=True, **common),
            ("scaling", "softcap"),
        )
        keys = {k: v for k, v in rows.items() if k not in ("iq_ptr", "iall_ptr", "qo_ptr")} | {"ik_ptr": "fp32"}
        yield f"qk_fix_keys/{tag}", qk_fix_keys_kernel, keys, common, ("scaling", "softcap")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    args = ap.parse_args()
    failed = 0
    for name, kernel, pointers, consts, floats in cases():
        t0 = time.perf_counter()
        try:
            k = compile_one(kernel, pointers, consts, args.arch, floats)
            print(
                f"ok   sm_{args.arch} {name}: {len(k.asm['cubin'])} B cubin, {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        except Exception as e:  # report every failing specialization, not only the first
            failed += 1
            print(f"FAIL sm_{args.arch} {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
