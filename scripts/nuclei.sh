#!/usr/bin/env bash
# Real-data check: Stage I on the 2018 Data Science Bowl nuclei fixture (12 train / 4 val
# tiles of 128x128, ../shared/data/nuclei-dsb2018 from the repository root), then the
# evaluation of the best checkpoint at native resolution. Small encoder, CPU, a few minutes.
#   usage: scripts/nuclei.sh [OUT] [extra `disseg train` flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/nuclei-dsb2018}
OUT=${1:-runs/nuclei}; shift || true
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi  # make test's venv, else yours
# OUT is replaced only where this script made it (the marker below): any other folder,
# such as a run of your own, is refused, not deleted.
MARK="$OUT/.made-by-scripts-nuclei"
if [ -e "$OUT" ]; then
  if [ -f "$MARK" ]; then rm -rf "$OUT"; else
    echo "scripts/nuclei.sh: $OUT exists and was not made by this script (no $MARK): remove it or pick another OUT" >&2
    exit 2
  fi
fi
"$PY" -m models.cli train --stage 1 --data "$DATA" --out "$OUT" --encoder resnet18 --size 128 \
    --batch-size 4 --epochs 15 --lr 1e-3 --lr-encoder 1e-3 --dropout-size 16 --no-progress "$@"
"$PY" -m models.cli evaluate --checkpoint "$OUT/best.pt" --data "$DATA" --split val --native --out "$OUT/eval"
touch "$MARK"
