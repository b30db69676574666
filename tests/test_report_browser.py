"""The report in a real browser: headless Chromium opens index.html and a case page from the file
system, takes screenshots, and finds no console error and no broken image.

The pages' own inline script marks `<html data-check="ok">` after loading when every image has
pixels and no script failed; `--dump-dom` prints the DOM after that, and Chromium's log on stderr
carries every console message. Skips cleanly where Chromium (Debian's `chromium`) is missing and
cannot be installed (only as root, with apt-get).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factory import write_case

from tumorseg.report import report

INSTALL_TIMEOUT_S = 600
BROWSER_TIMEOUT_S = 120
CONSOLE_RE = re.compile(r"CONSOLE|Uncaught", re.IGNORECASE)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=INSTALL_TIMEOUT_S,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not available (Debian package 'chromium')")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    preds = root / "preds"
    preds.mkdir()
    for i in range(3):
        seg = nib.load(write_case(root / "data", f"case_{i}", seed=i) / f"case_{i}_seg.nii.gz")
        labels = np.asarray(seg.dataobj)
        labels[labels == 2] = (0, 2, 0)[i]
        labels[: 20 + 4 * i] = 0  # three different whole-tumour volumes; case_2's prediction is empty
        nib.save(nib.Nifti1Image(labels, seg.affine), preds / f"case_{i}.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(seg.shape).astype(np.float32), seg.affine),
             preds / "case_0_uncertainty.nii.gz")
    result = report(preds, images=root / "data", gt=root / "data", out=root / "out", progress=False)
    assert [len(c.warnings) for c in result.cases][2:] == [1] and not result.failed  # the empty one, reported
    return result


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)


def check_page(chromium: str, page: Path, tmp_path: Path) -> str:
    """The page's DOM after loading; fails on console messages."""
    proc = run_chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if CONSOLE_RE.search(line)]
    assert not console, console
    return proc.stdout


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("which", ["index", "case_0", "case_2"])
def test_pages_load_without_errors_or_broken_images(chromium, built, which, tmp_path):
    page = built.index if which == "index" else built.index.parent / "cases" / f"{which}.html"
    dom = check_page(chromium, page, tmp_path)
    assert 'data-check="ok"' in dom, re.findall(r'data-check="[^"]*"', dom)
    shot = tmp_path / f"{which}.png"
    proc = run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1600",
                        "--hide-scrollbars", page.as_uri())
    assert proc.returncode == 0 and shot.is_file() and png_size(shot) == (1280, 1600)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_a_broken_image_is_caught(chromium, built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built.index.parent, copy)
    next(copy.glob("cases/*_thumb.png")).unlink()
    dom = check_page(chromium, copy / "index.html", tmp_path)
    assert "broken image" in re.search(r'data-check="([^"]*)"', dom).group(1)


def test_clicking_a_header_sorts_the_table(chromium, built, tmp_path):
    """A copy of index.html clicks the WT_cm3 header twice after loading and records the order."""
    copy = tmp_path / "copy"
    shutil.copytree(built.index.parent, copy)
    probe = copy / "index.html"
    script = """<script>window.addEventListener("load", function () {
      var th = Array.prototype.find.call(document.querySelectorAll("#cases th"),
        function (h) { return h.textContent === "WT_cm3"; });
      var order = function () { return Array.prototype.map.call(document.querySelector("#cases").tBodies[0].rows,
        function (r) { return r.cells[1].textContent; }).join(","); };
      th.click(); var up = order(); th.click();
      document.documentElement.setAttribute("data-order", up + "|" + order());
    });</script></body>"""
    probe.write_text(probe.read_text().replace("</body>", script))
    dom = check_page(chromium, probe, tmp_path)
    with open(built.csv, newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: float(r["WT_cm3"]))
    up = ",".join(r["case"] for r in rows)
    down = ",".join(r["case"] for r in reversed(rows))
    assert re.search(r'data-order="([^"]*)"', dom).group(1) == f"{up}|{down}"
