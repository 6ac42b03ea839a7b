#!/bin/bash
# Run from this directory. (1) Finish the third 2-fold split (--fold-seed 2) that ../cpu-2026-12-05g/split2_repeats.sh
# left at its 30-minute limit: the same command continues its table there. (2) Two more splits (--fold-seed 3, 4),
# the same command otherwise: random init and CORAL (512 pretraining steps, the same encoders as every 2-fold table
# since ../cpu-2026-12-05f) both fine-tuned twice per run at M = 1, 20 seeds. Each part stops by SIGINT at its
# limit and keeps its finished runs; the same command continues it.
set -u
CORAL=/work/main/.venv/bin/coral
S=$(date +%s)
(cd ../cpu-2026-12-05g && timeout -s INT 1200 $CORAL bench lowlabel --quick --seeds 20 --fold-seed 2 --methods random,coral \
  --pretrain-epochs 64 --finetune-repeats 2 --table split2_rep2_folds2_table.json) > split2_continued.log 2> split2_continued.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> split2_continued.err
for F in 3 4; do
  S=$(date +%s)
  timeout -s INT 3000 $CORAL bench lowlabel --quick --seeds 20 --fold-seed $F --methods random,coral \
    --pretrain-epochs 64 --finetune-repeats 2 --table split${F}_rep2_folds2_table.json > split${F}_rep2_folds2.log 2> split${F}_rep2_folds2.err
  echo "rc $? wall $(( $(date +%s)-S )) s" >> split${F}_rep2_folds2.err
done
