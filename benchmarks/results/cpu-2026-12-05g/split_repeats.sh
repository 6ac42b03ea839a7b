#!/bin/bash
# Another split into 2 folds (--fold-seed 1): random init and CORAL (512 pretraining steps, the same encoders as in
# ../cpu-2026-12-05f/coral_repeats.sh), both fine-tuned twice per run at M = 1, 20 seeds.
set -u
S=$(date +%s)
timeout -s INT 3000 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed 1 --methods random,coral \
  --pretrain-epochs 64 --finetune-repeats 2 --table split1_rep2_folds2_table.json > split1_rep2_folds2.log 2> split1_rep2_folds2.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> split1_rep2_folds2.err
