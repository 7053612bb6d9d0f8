"""Only bindings/ may import triton: engine/ calls kernels through causalscan.bindings.ops.

Exit 1 naming every engine/ line that imports triton (or a kernel module directly)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAD = re.compile(r"^\s*(import triton|from triton|from causalscan\.kernels|import causalscan\.kernels)")

hits = [
    f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
    for path in sorted((ROOT / "engine").rglob("*.py"))
    for i, line in enumerate(path.read_text().splitlines(), start=1)
    if BAD.match(line)
]
if hits:
    print("engine/ must reach kernels through causalscan.bindings only:\n" + "\n".join(hits))
    sys.exit(1)
