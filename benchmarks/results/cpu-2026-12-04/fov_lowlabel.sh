#!/usr/bin/env bash
# Random init against CORAL at M = 1 (quick setting, 10 seeds x 2 folds) on a phantom cohort whose fields of
# view differ (0.8-1.6 times 230 mm at 1.8 mm), with each slice resized whole and at 3.6 mm per pixel (the
# quick model's 64 pixels then take the central 230 mm of every scan).
set -eu
cd "$(dirname "$0")"
CORAL=../../../.venv/bin/coral
$CORAL bench lowlabel --quick --seeds 10 --methods random,coral --phantom-fov 0.8,1.6 \
  --table fov_whole_table.json > fov_whole.log 2>&1
$CORAL bench lowlabel --quick --seeds 10 --methods random,coral --phantom-fov 0.8,1.6 --pixel-spacing 3.6 \
  --table fov_mm_table.json > fov_mm.log 2>&1
