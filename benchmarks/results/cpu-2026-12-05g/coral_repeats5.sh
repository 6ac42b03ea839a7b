#!/bin/bash
# CORAL (512 pretraining steps) fine-tuned twice per run in the 5-fold draws at M = 1, as random init in
# ../cpu-2026-12-05f/rand_repeats.sh (its second command).
set -u
S=$(date +%s)
timeout -s INT 3300 /work/main/.venv/bin/coral bench lowlabel --quick --folds 5 --labeled 1 --seeds 16 --methods coral \
  --pretrain-epochs 64 --finetune-repeats 2 --table coral_rep2_folds5_table.json > coral_rep2_folds5.log 2> coral_rep2_folds5.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> coral_rep2_folds5.err
