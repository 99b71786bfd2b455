"""`make tour`: execute every notebook, keep executed copies (+ HTML) under build/, refresh figures/,
and print one table of the claims the notebooks measured.

`python -m diffnb.tour 01 04` re-runs only the notebooks with those numbers; the other claims are kept."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExecutePreprocessor

    build = ROOT / "build" / "tour"
    results = build / "results"
    only = sys.argv[1:] if argv is None else argv
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        if unknown := set(only) - {p.name[:2] for p in notebooks}:
            raise SystemExit(f"no notebook numbered {sorted(unknown)}; known: {[p.name[:2] for p in notebooks]}")
        notebooks = [p for p in notebooks if p.name[:2] in only]
        for p in notebooks:
            (results / f"{p.stem}.jsonl").unlink(missing_ok=True)
    else:
        shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    os.environ["DIFFNB_RESULTS"] = str(results)
    os.environ["DIFFNB_FIGURES"] = str(ROOT / "figures")
    failed = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        try:
            ExecutePreprocessor(timeout=1800, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
            status = "ok"
        except Exception as err:  # keep going: report every notebook
            status, _ = "FAILED", failed.append(path.name)
            print(f"{path.name}: {type(err).__name__}: {str(err)[-600:]}", file=sys.stderr)
        nbformat.write(nb, build / path.name)
        (build / path.with_suffix(".html").name).write_text(HTMLExporter().from_notebook_node(nb)[0])
        print(f"{path.name:32s} {status:6s} {time.time() - start:6.1f} s  -> {build / path.name}")
    rows = [json.loads(line) for f in sorted(results.glob("*.jsonl")) for line in f.read_text().splitlines()]
    print(f"\n{'notebook':14s} {'claim':52s} {'value':>9s} {'baseline':>9s}  target")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.4g}"
        print(f"{r['notebook']:14s} {r['claim']:52s} {r['value']:9.4g} {base:>9s}  {r['target']}")
    print(f"\nfigures: {ROOT / 'figures'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
