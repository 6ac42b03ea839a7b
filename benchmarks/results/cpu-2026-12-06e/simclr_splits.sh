#!/bin/bash
# Run from this folder. SimCLR (512 pretraining steps, as the other methods') fine-tuned twice per run at M = 1 in
# the 2-fold splits 2, 3 and 4 (--fold-seed), 20 seeds each, on the draws where random init, CORAL, PCL and GCL
# were fine-tuned twice (splits 0 and 1: ../cpu-2026-12-06d). Each split stops by SIGINT at 40 minutes, keeping its
# runs; the same command continues it.
set -u
for F in 2 3 4; do
  S=$(date +%s)
  timeout -s INT 2400 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed $F --methods simclr \
    --pretrain-epochs 64 --finetune-repeats 2 --table simclr_split${F}_rep2_folds2_table.json \
    > simclr_split${F}.log 2> simclr_split${F}.err
  echo "rc $? wall $(( $(date +%s)-S )) s" >> simclr_split${F}.err
done
