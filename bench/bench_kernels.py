"""Kernel throughput on a GPU: our Triton kernels against torch eager (the references) and
torch.compile of the same references, with the device's own copy bandwidth as the ceiling.

Shapes are those of a scan of the ~1B Llama shape (d_model 2048, 32 heads of 64, d_mlp 8192) on
8 rows of 512 tokens, bf16. ``perturb`` and ``attribute`` are memory-bound: the figure is GB/s of
the bytes they must move (each input read once, the output written once), and the share of the
measured copy bandwidth (``y.copy_(x)`` of the same bytes). ``qk_fix`` (O(T^2) per head) reports
milliseconds against the eager reference, which materialises ``[T, T]``. The torch.compile column
comes last (its compiles take most of the wall time); the results file is rewritten after every
figure, so a run stopped at a time limit keeps what it measured. Prints a table and saves it with
the machine to bench/results/.

    python bench/bench_kernels.py [--rows 8] [--seq 512] [--no-compile] [--out FILE]
    python bench/bench_kernels.py --check    # no timing: every case once on the CPU under the interpreter

Times nothing without CUDA: the interpreter's timings mean nothing. ``--check`` runs each case once
at a tiny size against its reference, so a call that no longer fits the ops fails here, not on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(fn, warmup=5, rep=50) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, L2 flushed between calls by triton.testing)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def cases(rows: int, seq: int, dev: str = "cuda"):
    """(name, fn_ours, fn_ref, bytes moved) for every memory-bound case."""
    from causalscan.bindings import ops
    from causalscan.kernels.attribute import attribute_ref
    from causalscan.kernels.perturb import perturb_ref

    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    sites = {"resid": (rows, seq, 1, 2048), "heads": (rows, seq, 32, 64), "neurons": (rows, seq, 8192, 1)}
    out = []
    for site, shape in sites.items():
        b, t, c, d = shape
        x = torch.randn(shape, device=dev, dtype=bf, generator=g)
        n = x.numel() * x.element_size()
        mask = torch.zeros(b, t, c, dtype=torch.bool, device=dev)
        mask[:, t // 2 :] = True  # half the positions patched
        src = torch.randn_like(x)
        vec = torch.randn(b, c, d, device=dev, dtype=bf)
        alpha = torch.randn(b, device=dev, dtype=bf)
        u = torch.nn.functional.normalize(torch.randn(b, c, d, device=dev), dim=-1).to(bf)
        m_bytes = mask.numel()
        per_op = {
            "patch": (dict(source=src), 2 * n + n // 2 + m_bytes),
            "add": (dict(vector=vec, alpha=alpha), 2 * n + m_bytes),
            "scale": (dict(alpha=alpha), 2 * n + m_bytes),
            "project_out": (dict(direction=u), 2 * n + m_bytes),
        }
        for op, (kw, nbytes) in per_op.items():
            out.append(
                (
                    f"perturb/{op}/{site}",
                    lambda x=x, op=op, kw=kw, m=mask: ops.perturb(x, op, m, **kw),
                    lambda x=x, op=op, kw=kw, m=mask: perturb_ref(x, op, m, **kw),
                    nbytes,
                )
            )
        delta, grad = torch.randn_like(x), torch.randn_like(x)
        for by_pos in (True, False):
            res = b * c * (t if by_pos else 1) * 4
            out.append(
                (
                    f"attribute/{'by_pos' if by_pos else 'all_pos'}/{site}",
                    lambda d_=delta, g_=grad, bp=by_pos: ops.attribute(None, d_, g_, bp),
                    lambda d_=delta, g_=grad, bp=by_pos: attribute_ref(None, d_, g_, bp),
                    2 * n + res,
                )
            )
    return out


def qk_case(rows: int, seq: int, dev: str = "cuda"):
    """(fn_ours, fn_ref materialising [T, T], the attention forward) of the QK fix."""
    from causalscan.bindings import ops
    from causalscan.kernels.qk_fix import qk_fix_ref

    bf = torch.bfloat16
    h, hkv, dh = 32, 8, 64
    q, q_o = (torch.randn(rows, h, seq, dh, device=dev, dtype=bf) for _ in range(2))
    k, k_o, v = (torch.randn(rows, hkv, seq, dh, device=dev, dtype=bf) for _ in range(3))
    dz = torch.randn(rows, seq, h, dh, device=dev, dtype=bf)
    i = torch.arange(seq, device=dev)
    bias = torch.zeros(seq, seq, device=dev).masked_fill(i[None] > i[:, None], float("-inf"))
    args = (q, k, v, dz, bias, dh**-0.5, None, q_o, k_o)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1), is_causal=True
    )
    return lambda: ops.qk_fix(*args), lambda: qk_fix_ref(*args), sdpa


def check() -> None:
    """Every case once at a tiny size on the CPU under Triton's interpreter, against its reference."""
    os.environ["TRITON_INTERPRET"] = "1"  # before causalscan's kernels are imported
    os.environ["CAUSALSCAN_BACKEND"] = "triton"
    ours_qk, ref_qk, _ = qk_case(1, 16, "cpu")
    for name, ours, ref, _ in [*cases(1, 4, "cpu"), ("qk_fix", ours_qk, ref_qk, 0)]:
        got, want = ours(), ref()
        if isinstance(got, dict):  # qk_fix: {name: tensor}
            got, want = [got[k] for k in sorted(want)], [want[k] for k in sorted(want)]
        got, want = ([t] if isinstance(t, torch.Tensor) else t for t in (got, want))
        err = max(
            float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
            for a, b in zip(got, want, strict=True)
        )
        print(f"{name:32s} ours vs reference: max diff / max |ref| = {err:.1e}")
        if err > 2e-2:  # bf16 outputs: a few ulps of 2^-8 at most
            sys.exit(f"{name}: ours and the reference disagree ({err:.1e})")
    print("all cases run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--out", default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (slow to compile)")
    p.add_argument("--check", action="store_true", help="run each case once on the CPU (interpreter), no timing")
    args = p.parse_args()
    if args.check:
        return check()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs CUDA: interpreter timings are meaningless (GPU figures stay pending)")
    os.environ["CAUSALSCAN_BACKEND"] = "triton"
    import triton

    machine = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("kernels-" + torch.cuda.get_device_name().replace(" ", "_") + ".json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save():  # after every figure: a run stopped at a time limit keeps what it measured
        out.write_text(json.dumps({"machine": machine, "rows": args.rows, "seq": args.seq, "results": rows}, indent=1))

    copy_gbs = {}
    memory_bound = cases(args.rows, args.seq)
    for name, ours, ref, nbytes in memory_bound:
        ms = {"ours": bench(ours), "eager": bench(ref)}
        key = nbytes // 2
        if key not in copy_gbs:  # a copy moves its bytes twice (read + write)
            x = torch.empty(key, dtype=torch.bfloat16, device="cuda")
            y = torch.empty_like(x)
            copy_gbs[key] = 2 * x.numel() * 2 / 1e6 / bench(lambda x=x, y=y: y.copy_(x))
        gbs = {k: nbytes / 1e6 / v for k, v in ms.items()}
        rows.append(
            {
                "case": name,
                "bytes": nbytes,
                **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                **{f"{k}_GBps": round(v, 1) for k, v in gbs.items()},
                "copy_GBps": round(copy_gbs[key], 1),
                "share_of_copy": round(gbs["ours"] / copy_gbs[key], 3),
            }
        )
        r = rows[-1]
        print(
            f"{name:32s} ours {r['ours_GBps']:7.0f} GB/s  eager {r['eager_GBps']:7.0f}  "
            f"copy {r['copy_GBps']:7.0f}  ours/copy {r['share_of_copy']:.2f}",
            flush=True,
        )
        save()
    ours, ref, sdpa = qk_case(args.rows, args.seq)
    qk = {
        "case": f"qk_fix/q+k/B{args.rows}-H32-Hkv8-T{args.seq}-Dh64",
        "ours_ms": bench(ours),
        "eager_ms": bench(ref),
        "sdpa_forward_ms": bench(sdpa),
    }
    qk["eager_over_ours"] = round(qk["eager_ms"] / qk["ours_ms"], 2)  # the reference materialises [T, T]
    rows.append(qk)
    print(
        f"{qk['case']:32s} ours {qk['ours_ms']:.3f} ms  eager {qk['eager_ms']:.3f} ms ({qk['eager_over_ours']}x)  "
        f"(attention forward {qk['sdpa_forward_ms']:.3f} ms)",
        flush=True,
    )
    save()
    if args.no_compile:
        print(f"saved {out}")
        return
    # torch.compile of each reference last: its compiles take most of the wall time
    for row, (name, _, ref, nbytes) in zip(rows, memory_bound, strict=False):
        row["compile_ms"] = round(bench(torch.compile(ref)), 4)
        row["compile_GBps"] = round(nbytes / 1e6 / row["compile_ms"], 1)
        print(f"{name:32s} torch.compile {row['compile_GBps']:7.0f} GB/s", flush=True)
        save()
    print(f"saved {out}")


if __name__ == "__main__":
    main()
