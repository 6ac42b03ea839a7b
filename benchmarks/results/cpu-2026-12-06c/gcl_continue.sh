#!/bin/bash
# Run from this folder after gcl_splits.sh was stopped: the same commands continue split 0's table to its 40 runs,
# then run split 1 (30 minutes at most; the same command continues it).
set -u
for F in 0 1; do
  S=$(date +%s)
  timeout -s INT 1800 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed $F --methods gcl \
    --pretrain-epochs 64 --finetune-repeats 2 --table gcl_split${F}_rep2_folds2_table.json \
    > gcl_split${F}_continued.log 2> gcl_split${F}_continued.err
  echo "rc $? wall $(( $(date +%s)-S )) s" >> gcl_split${F}_continued.err
done
