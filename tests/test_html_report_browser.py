"""The analysis command's report.html in a real browser: headless Chromium renders it
to a screenshot (not blank) and, via the page's own load-time count, reports that
every image decoded. A page with one corrupted image is the control that the count
can fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.analyze_data import analysed_checkpoint

pytestmark = pytest.mark.slow  # renders the report of a trained tiny checkpoint (see analyze_data)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # Debian, Ubuntu, Google's package
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
INSTALL = "apt-get update && apt-get install -y chromium (or `make chromium`)"


def find_chromium() -> Path | None:
    """The first of BROWSERS on PATH."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def require_chromium() -> Path:
    """The browser, or: under CI (CI=true) a failure, elsewhere a skip saying how to install it."""
    path = find_chromium()
    if path is None:
        reason = f"no Chromium on PATH (looked for {', '.join(BROWSERS)}): install it with {INSTALL}"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return path


def test_chromium_is_found_on_path_and_missing_fails_under_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no Chromium on PATH.*apt-get install -y chromium"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium-browser, google-chrome"):
        require_chromium()
    fake = tmp_path / "google-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert require_chromium() == fake


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"  # a fresh profile per launch
    return subprocess.run([str(require_chromium()), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def _images_loaded(tmp: Path, page: Path) -> tuple[int, int]:
    r = _chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    found = re.search(r'<body[^>]*data-images-loaded="(\d+)/(\d+)"', r.stdout)
    assert found, f"the page's load script did not run; stderr:\n{r.stderr[-2000:]}"
    return int(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    require_chromium()
    out, _ = analysed_checkpoint(tmp_path_factory.getbasetemp())
    return out / "report.html"


def test_report_renders_with_all_images(report, tmp_path):
    n_img = len(re.findall(r"<img ", report.read_text()))
    assert n_img >= 7  # inputs, r2g, g2r, head, time, layer, one specific-reference patch
    assert _images_loaded(tmp_path, report) == (n_img, n_img)

    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2400, 1200, 3)
    assert pixels.std() > 20  # not a blank page
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 500  # photos and jet heat maps, not just text on white
    # the figures are where the page puts them: the top quarter is not all background
    assert (np.abs(pixels[:600].astype(int) - pixels[0, 0]).sum(-1) > 60).mean() > 0.05


def test_broken_image_is_detected(report, tmp_path):
    page = report.read_text()
    first = page.index("base64,") + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(page[:first] + "bm90IGEgcG5n" + page[page.index('"', first):])  # "not a png"
    n = len(re.findall(r"<img ", page))
    assert _images_loaded(tmp_path, broken) == (n - 1, n)
