"""The plan report: every plot is written, referenced, and loads in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from perpair.plan import build_plan, report_dir, resolve_schedule, write_plan, write_report
from perpair.plan.report import PLOTS
from plan_helpers import make_pairs, random_annotations

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Records, once everything has loaded, each image's natural size; a missing or broken image has width 0.
PROBE = """<img src="missing-on-purpose.png" alt="control">
<script>
window.addEventListener("load", function () {
  var seen = {};
  document.querySelectorAll("img").forEach(function (img) {
    seen[img.getAttribute("src")] = [img.complete, img.naturalWidth, img.naturalHeight];
  });
  var pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify(seen);
  document.body.appendChild(pre);
});
</script>
"""


def _report(tmp_path: Path, preset: str, with_annotations: bool) -> Path:
    pairs = tmp_path / "pairs.parquet"
    scores = [(5.0 + (i % 7) / 2, 5.0) for i in range(80)]
    ids = make_pairs(pairs, scores)
    annotations = None
    if with_annotations:
        annotations = tmp_path / "annotations.parquet"
        random_annotations(annotations, pairs, ids, unannotated=5)
    result = build_plan(pairs, annotations, resolve_schedule(preset), preset=preset)
    plan = tmp_path / "plan.parquet"
    write_plan(result, plan)
    page = write_report(result.table, result.provenance, report_dir(plan))
    assert page == tmp_path / "plan_report" / "index.html"
    return page


@pytest.mark.parametrize(("preset", "with_annotations"), [("sp2dpo+mixdpo", True), ("dpo", False)])
def test_report_writes_and_links_every_plot(tmp_path, preset, with_annotations):
    page = _report(tmp_path, preset, with_annotations)
    text = page.read_text()
    for name, _ in PLOTS:
        assert (page.parent / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f'src="{name}"' in text
    assert "category" in text and "preference" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    page = _report(tmp_path, "sp2dpo+mixdpo", True)
    probed = page.with_name("probe.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="img-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe output; chromium rc={done.returncode}, stderr tail: {done.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    assert seen.pop("missing-on-purpose.png")[1] == 0  # the probe does see a broken image
    assert set(seen) == {name for name, _ in PLOTS}
    for name, (complete, width, height) in seen.items():
        assert complete and width > 100 and height > 100, name


def test_category_magnitude_counts_round_halves_up():
    """An ensemble's mean magnitudes counted in the report's grid: halves go up, alike at every magnitude."""
    import numpy as np

    from perpair.plan.report import category_magnitude_counts

    category = np.array(["style"] * 6 + [None], dtype=object)
    magnitude = np.array([0.5, 1.5, 2.5, 0.49, 3.0, 0.0, np.nan])
    assert category_magnitude_counts(category, magnitude)["style"] == [2, 1, 1, 2]
