"""The documentation site builds with ``mkdocs build --strict`` (no broken link, no missing
reference, no page left out of the navigation), and its API reference has an entry for every
public name.  The site's code blocks run in ``tests/test_readme_standalone.py``; the
docstring examples in ``tests/test_api_docs.py`` and as doctests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_api_docs import ENTRIES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


def test_the_site_builds_strictly_and_has_its_pages(site):
    for page in ("index.html", "getting-started/index.html", "api/index.html",
                 "changelog/index.html", "architecture/index.html"):  # fmt: skip
        assert (site / page).is_file(), page


def test_every_public_name_has_an_entry_in_the_api_reference(site):
    anchors = set()
    for page in (site / "api").rglob("*.html"):
        anchors.update(re.findall(r'id="(hypergradient[\w.]*)"', page.read_text()))
    missing = sorted(path for path in ENTRIES if path not in anchors)
    assert not missing, f"no API entry (anchor) for {len(missing)} names: {missing[:20]}"
