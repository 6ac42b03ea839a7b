#!/bin/bash
# A third split into 2 folds (--fold-seed 2), as split_repeats.sh: random init and CORAL (512 pretraining steps, the
# same encoders) both fine-tuned twice per run at M = 1, 20 seeds; stopped by SIGINT at 30 minutes, keeping its runs.
set -u
S=$(date +%s)
timeout -s INT 1800 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed 2 --methods random,coral \
  --pretrain-epochs 64 --finetune-repeats 2 --table split2_rep2_folds2_table.json > split2_rep2_folds2.log 2> split2_rep2_folds2.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> split2_rep2_folds2.err
