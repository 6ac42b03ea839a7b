#!/bin/bash
# Run from this folder after pcl_splits.sh: the same commands continue each split's table where its 30 minutes
# stopped it (unit tests had run beside it), up to 20 seeds; a table already complete finishes at once.
set -u
for F in 2 3 4 0; do
  S=$(date +%s)
  timeout -s INT 1200 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed $F --methods pcl \
    --pretrain-epochs 64 --finetune-repeats 2 --table pcl_split${F}_rep2_folds2_table.json \
    > pcl_split${F}_continued.log 2> pcl_split${F}_continued.err
  echo "rc $? wall $(( $(date +%s)-S )) s" >> pcl_split${F}_continued.err
done
