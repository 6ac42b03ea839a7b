#!/bin/bash
# CORAL (512 pretraining steps) fine-tuned twice per run in the 2-fold draws at M = 1, as random init in rand_repeats.sh.
set -u
S=$(date +%s)
timeout -s INT 2400 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --methods coral --pretrain-epochs 64 \
  --finetune-repeats 2 --table coral_rep2_folds2_table.json > coral_rep2_folds2.log 2> coral_rep2_folds2.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> coral_rep2_folds2.err
