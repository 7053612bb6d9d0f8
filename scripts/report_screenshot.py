"""Re-make docs/report.png: the main job's report (`causalscan scan --report`), its first screen
and heatmaps, in headless chromium (Debian's package, driven by playwright).

    python scripts/report_screenshot.py [--out docs/report.png]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from causalscan.cli import main as cli

    with tempfile.TemporaryDirectory() as d:
        assert cli(["scan", "--out", d, "--report"]) == 0
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1100, "height": 1500})
            page.goto((Path(d) / "report.html").as_uri())
            page.wait_for_function("document.querySelectorAll('.main-svg').length > 0")
            page.screenshot(path=args.out)
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
