#!/bin/bash
# PCL and GCL (512 pretraining steps) fine-tuned twice per run in the 5-fold draws at M = 1, as CORAL in
# coral_repeats5.sh; started after it, with nothing else running.
set -u
S=$(date +%s)
timeout -s INT 6000 /work/main/.venv/bin/coral bench lowlabel --quick --folds 5 --labeled 1 --seeds 16 \
  --methods pcl,gcl --pretrain-epochs 64 --finetune-repeats 2 --table baselines_rep2_folds5_table.json \
  > baselines_rep2_folds5.log 2> baselines_rep2_folds5.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> baselines_rep2_folds5.err
