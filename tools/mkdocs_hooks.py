"""mkdocs hooks: the benchmark results, published beside the pages that quote them.

Every benchmark writes its table and plot to ``benchmarks/results/`` (the machine and date
in the table's first line).  Rather than copying them into ``docs/`` (where a copy goes
stale), :func:`on_files` adds that folder to the site as ``results/``: a page links to
``results/amortized.md`` (relative to the site root) and shows ``results/amortized.png``,
and a rerun of the benchmark updates the site at the next build.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SUFFIXES = {".md", ".png", ".json"}


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in SUFFIXES and not path.stem.endswith("_quick"):
            files.append(
                File(
                    f"results/{path.name}",
                    src_dir=str(RESULTS.parent),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files
