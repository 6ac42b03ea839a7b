#!/bin/bash
# Random init fine-tuned twice per run (its own seed, then another), in the 2-fold and the 5-fold draws at M = 1.
set -u
S=$(date +%s)
timeout -s INT 3000 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --methods random --finetune-repeats 2 \
  --table rand_rep2_folds2_table.json > rand_rep2_folds2.log 2> rand_rep2_folds2.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> rand_rep2_folds2.err
S=$(date +%s)
timeout -s INT 3000 /work/main/.venv/bin/coral bench lowlabel --quick --folds 5 --labeled 1 --seeds 16 --methods random \
  --finetune-repeats 2 --table rand_rep2_folds5_table.json > rand_rep2_folds5.log 2> rand_rep2_folds5.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> rand_rep2_folds5.err
