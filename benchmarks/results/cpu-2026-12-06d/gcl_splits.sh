#!/bin/bash
# Run from this folder. GCL (512 pretraining steps, as CORAL's and PCL's) fine-tuned twice per run at M = 1 in the
# 2-fold splits 2-4 (--fold-seed), 20 seeds each, on the draws where random init, CORAL and PCL were fine-tuned twice
# (../cpu-2026-12-05g, ../cpu-2026-12-06, ../cpu-2026-12-06b); splits 0 and 1 are in ../cpu-2026-12-06c. Each split
# stops by SIGINT at 40 minutes, keeping its runs; the same command continues it.
set -u
for F in 2 3 4; do
  S=$(date +%s)
  timeout -s INT 2400 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed $F --methods gcl \
    --pretrain-epochs 64 --finetune-repeats 2 --table gcl_split${F}_rep2_folds2_table.json \
    > gcl_split${F}.log 2> gcl_split${F}.err
  echo "rc $? wall $(( $(date +%s)-S )) s" >> gcl_split${F}.err
done
