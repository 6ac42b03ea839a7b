#!/bin/bash
# Run from this folder. PCL (512 pretraining steps, as CORAL's) fine-tuned twice per run at M = 1 in the 2-fold splits
# 2, 3, 4 and 0 (--fold-seed), 20 seeds each, on the draws where random init and CORAL were fine-tuned twice
# (split 0: ../cpu-2026-12-05f, splits 2: ../cpu-2026-12-05g, 3 and 4: ../cpu-2026-12-06; split 1's PCL is
# ../cpu-2026-12-06/pcl_split1_rep2_folds2_table.json). Each split stops by SIGINT at 30 minutes, keeping its runs;
# the same command continues it.
set -u
for F in 2 3 4 0; do
  S=$(date +%s)
  timeout -s INT 1800 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed $F --methods pcl \
    --pretrain-epochs 64 --finetune-repeats 2 --table pcl_split${F}_rep2_folds2_table.json \
    > pcl_split${F}.log 2> pcl_split${F}.err
  echo "rc $? wall $(( $(date +%s)-S )) s" >> pcl_split${F}.err
done
