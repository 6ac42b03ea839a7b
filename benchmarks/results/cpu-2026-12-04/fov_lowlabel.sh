#!/usr/bin/env bash
# Random init against CORAL at M = 1 (quick setting, SEEDS seeds x 2 folds; default 10) on a phantom cohort whose
# fields of view differ (0.8-1.6 times 230 mm at 1.8 mm), with each slice resized whole and at 3.6 mm per pixel
# (the quick model's 64 pixels then take the central 230 mm of every scan). The tables continue: SEEDS=20 after
# the default runs seeds 10-19 only (logs fov_whole_seeds20.log and fov_mm_seeds20.log).
set -eu
cd "$(dirname "$0")"
CORAL=../../../.venv/bin/coral
SEEDS=${SEEDS:-10}
suffix=$([ "$SEEDS" = 10 ] || echo "_seeds$SEEDS")
for table in whole mm; do
  scale=$([ $table = mm ] && echo "--pixel-spacing 3.6" || true)
  $CORAL bench lowlabel --quick --seeds "$SEEDS" --methods random,coral --phantom-fov 0.8,1.6 $scale \
    --table fov_${table}_table.json > fov_${table}${suffix}.log 2>&1
done
