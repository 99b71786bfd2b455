#!/usr/bin/env bash
# Re-measure every toy benchmark whose numbers the README cites (run after a new toy model ships), in the order of
# the README's table. Each writes benchmarks/results/<name>.json. Fixed sets, seeds and step counts throughout:
# no setting here is tuned on these sets. About 40 minutes on a quiet 2-core CPU (the ConsiStory ladders are most
# of it); `ONLY=hyperfeatures bash benchmarks/toy_all.sh` runs the lines that mention a word.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ONLY=${ONLY:-}
run() { if [[ -z "$ONLY" || "$*" == *"$ONLY"* ]]; then echo "== $*"; "$PY" "$@"; fi; }

run benchmarks/style_aligned_toy.py --sets 24
run benchmarks/style_aligned.py
run benchmarks/consistory_toy.py --sets 24 --start 200
run benchmarks/consistory_toy.py --sets 24 --start 200 --dropout-sweep
run benchmarks/consistory_toy.py --sets 24 --start 200 --injection
run benchmarks/consistory.py
run benchmarks/hyperfeatures_toy.py
run benchmarks/hyperfeatures_toy.py --seed 2 --out hyperfeatures_toy_seed2.json
run benchmarks/hyperfeatures_toy.py --steps= --out hyperfeatures_toy_5steps.json
run benchmarks/hyperfeatures_toy.py --no-cross --out hyperfeatures_toy_listed.json
run benchmarks/emerdiff_toy.py --renders 20
run benchmarks/emerdiff_toy.py --renders 24 --start 300 --only "K = 2 x regions" \
    --out benchmarks/results/emerdiff_toy_overseg.json
run benchmarks/emerdiff.py
run benchmarks/diffsim.py
