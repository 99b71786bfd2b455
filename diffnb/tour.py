"""`make tour`: execute every notebook, keep executed copies (+ HTML) under build/, refresh figures/,
and print one table of the claims the notebooks measured (with a ✓ / ✗ column for claims that have a bar).

    python -m diffnb.tour                      # every notebook of the repository this package sits in
    python -m diffnb.tour 01 04                # only those numbers; the other claims are kept
    python -m diffnb.tour --notebooks DIR      # notebooks elsewhere (e.g. a clone, when diffnb is pip-installed)
    python -m diffnb.tour --summarize DIR      # no execution: the table of claims recorded in DIR (make test
                                               # records the toy run's in build/claims); --write: also RESULTS.md

The notebooks are not part of the installed package: they are found in `--notebooks DIR`, else `$DIFFNB_NOTEBOOKS`,
else `notebooks/` next to the package (a clone or an editable install), else `./notebooks`. Finding none is an error
(exit status 2) that says so; build/ and figures/ are written next to the notebooks folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERN = "[0-9][0-9]_*.ipynb"
MARKS = {True: "✓", False: "✗", None: ""}


def find_notebooks(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding the numbered notebooks; a clear error (SystemExit 2) naming where it looked otherwise."""
    if folder is not None:
        candidates = [Path(folder)]
    elif os.environ.get("DIFFNB_NOTEBOOKS"):
        candidates = [Path(os.environ["DIFFNB_NOTEBOOKS"])]
    else:
        candidates = [ROOT / "notebooks", Path.cwd() / "notebooks"]
    for c in candidates:
        if c.is_dir() and any(c.glob(PATTERN)):
            return c.resolve()
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    print(f"diffnb.tour: no notebooks ({PATTERN}) found in {looked}. The notebooks ship with the repository, not "
          f"with the installed package: run `make tour` in a clone, or pass --notebooks DIR (or set "
          f"DIFFNB_NOTEBOOKS) to point at a clone's notebooks/ folder.", file=sys.stderr)
    raise SystemExit(2)


def table(rows: list[dict]) -> str:
    """The claims table: notebook, claim, value, baseline, met (✓ / ✗, blank when the claim has no bar), target."""
    lines = [f"{'notebook':14s} {'claim':52s} {'value':>9s} {'baseline':>9s} met  target"]
    for r in rows:
        base = "" if r.get("baseline") is None else f"{r['baseline']:.4g}"
        lines.append(f"{r['notebook']:14s} {r['claim']:52s} {r['value']:9.4g} {base:>9s}  {MARKS[r.get('met')]:1s}   "
                     f"{r.get('target', '')}")
    met = [r.get("met") for r in rows if r.get("met") is not None]
    if met:
        lines.append(f"\n{sum(met)} of {len(met)} claims with a bar met")
    return "\n".join(lines)


def markdown(rows: list[dict], stamp: str) -> str:
    """RESULTS.md: the claims table as the README links it, with where and when it was measured."""
    lines = ["# Measured claims", "", f"Generated ({stamp}) by `make tour`, or by `python -m diffnb.tour --summarize",
             "build/claims --write` after `make test`; do not edit by hand. Each row is printed and recorded by",
             "`diffnb.nb.claim` in the notebook named; ✓ / ✗: the measured value meets / misses its bar.", "",
             "| notebook | claim | value | baseline | met | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = "" if r.get("baseline") is None else f"{r['baseline']:.4g}"
        lines.append(f"| {r['notebook']} | {r['claim']} | {r['value']:.4g} | {base} | {MARKS[r.get('met')]} | "
                     f"{r.get('target', '')} |")
    met = [r.get("met") for r in rows if r.get("met") is not None]
    lines += ["", f"{sum(met)} of {len(met)} claims with a bar met."] if met else []
    return "\n".join(lines) + "\n"


def _stamp(root: Path) -> str:
    import platform
    import subprocess

    import torch

    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown commit"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    model = os.environ.get("DIFFNB_MODEL", "toy")
    return f"{time.strftime('%Y-%m-%d', time.gmtime())}, commit {rev}, model {model}, {device}, torch {torch.__version__}"


def read_claims(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(Path(folder).glob("*.jsonl")) for line in f.read_text().splitlines()]


def summarize(folder: Path, write: bool) -> int:
    rows = read_claims(folder)
    if not rows:
        print(f"no claims recorded in {folder} (run the notebooks with DIFFNB_RESULTS={folder})", file=sys.stderr)
        return 1
    print(table(rows))
    if write:
        (ROOT / "RESULTS.md").write_text(markdown(rows, _stamp(ROOT)))
        print(f"claims table: {ROOT / 'RESULTS.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffnb.tour", description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="notebook numbers to re-run (default: all)")
    parser.add_argument("--notebooks", help="folder with the numbered notebooks (default: see the module docstring)")
    parser.add_argument("--summarize", type=Path, help="print the claims recorded in this folder; execute nothing")
    parser.add_argument("--write", action="store_true", help="with --summarize: also write RESULTS.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        return summarize(args.summarize, args.write)
    folder = find_notebooks(args.notebooks)
    try:
        import nbformat
        from nbconvert import HTMLExporter
        from nbconvert.preprocessors import ExecutePreprocessor
    except ImportError as err:
        print(f"diffnb.tour needs nbformat and nbconvert ({err.name} is missing): pip install 'diffnb[dev]'",
              file=sys.stderr)
        return 2

    root = folder.parent
    build = root / "build" / "tour"
    results = build / "results"
    notebooks = sorted(folder.glob(PATTERN))
    if args.only:
        if unknown := set(args.only) - {p.name[:2] for p in notebooks}:
            print(f"no notebook numbered {sorted(unknown)}; known: {[p.name[:2] for p in notebooks]}", file=sys.stderr)
            return 2
        notebooks = [p for p in notebooks if p.name[:2] in args.only]
        for p in notebooks:
            (results / f"{p.stem}.jsonl").unlink(missing_ok=True)
    else:
        shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    os.environ["DIFFNB_RESULTS"] = str(results)
    os.environ["DIFFNB_FIGURES"] = str(root / "figures")
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
    rows = read_claims(results)
    print()
    print(table(rows) if rows else "no claims were recorded (did the notebooks call diffnb.nb.claim?)")
    print(f"\nfigures: {root / 'figures'}")
    if rows and not failed:
        (root / "RESULTS.md").write_text(markdown(rows, _stamp(root)))
        print(f"claims table: {root / 'RESULTS.md'}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
