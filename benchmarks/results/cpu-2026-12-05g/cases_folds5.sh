#!/bin/bash
# Random init and CORAL (512 pretraining steps) once more in the 5-fold draws at M = 1, 16 seeds, now that each run
# records every test volume's Dice (dice_by_case): the runs must equal those of
# ../cpu-2026-12-05f/folds5_pre64_abl_s16_table.json bit for bit, and their leads split over the pairs of labelled
# and test subjects. Started after split_repeats.sh, with nothing else running.
set -u
S=$(date +%s)
timeout -s INT 3000 /work/main/.venv/bin/coral bench lowlabel --quick --folds 5 --labeled 1 --seeds 16 \
  --methods random,coral --pretrain-epochs 64 --table cases_folds5_table.json > cases_folds5.log 2> cases_folds5.err
echo "rc $? wall $(( $(date +%s)-S )) s" >> cases_folds5.err
