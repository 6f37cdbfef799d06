"""What every `cxrray reproduce` recipe shares: phantoms made once per folder, and the summary + HTML page
written side by side. Recipes live in their method's package (`cohorts.reproduce`, `cheff.reproduce`)."""
from __future__ import annotations

import json
from pathlib import Path


def phantoms_once(n: int, folder: Path, phantom_cfg, progress) -> None:
    """n phantom DICOMs under `folder`, unless the folder already holds exactly n (a rerun)."""
    from cxrray.data.phantom import generate

    labels = folder / "labels.csv"
    if not labels.exists() or len(labels.read_text().splitlines()) != n + 1:
        step = max(1, n // 5)
        generate(n, folder, phantom_cfg, progress=lambda d, t: (d % step == 0 or d == t) and progress(f"[phantoms] {d}/{t}"))


def write_report(workdir: Path, summary: dict, page_html: str) -> Path:
    """summary.json and reproduce.html under `workdir`; returns the page's path."""
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    page = workdir / "reproduce.html"
    page.write_text(page_html)
    return page
