#!/bin/bash
# Run from this folder. PCL (512 pretraining steps, as CORAL's) fine-tuned twice per run at M = 1 in the second 2-fold
# split (--fold-seed 1), 20 seeds, where ../cpu-2026-12-05g/split1_rep2_folds2_table.json holds random init and
# CORAL fine-tuned twice on the same draws: CORAL against PCL with both at the mean of two fine-tunings. Stopped by
# SIGINT at 30 minutes, keeping its runs; the same command continues it.
set -u
S=$(date +%s)
timeout -s INT 1800 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed 1 --methods pcl \
  --pretrain-epochs 64 --finetune-repeats 2 --table pcl_split1_rep2_folds2_table.json > pcl_split1.log 2> pcl_split1.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> pcl_split1.err
