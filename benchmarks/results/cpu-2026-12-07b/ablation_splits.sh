#!/bin/bash
# Run from this folder. The ablations RAL (RAL only) and OAL (OAL only), pretrained for 512 steps as every other
# method, fine-tuned twice per run at M = 1 in the 2-fold splits 0 to 4 (--fold-seed), 20 seeds each, on the draws
# where random init, CORAL, PCL, GCL and SimCLR were fine-tuned twice. Each run of a method and split stops by SIGINT
# at 40 minutes, keeping its runs; the same command continues its table (a complete table, 40 runs, is skipped; the
# logs of a continued table are appended to).
set -u
for F in 0 1 2 3 4; do
  for M in ral oal; do
    T=${M}_split${F}_rep2_folds2_table.json
    if [ -f $T ] && python3 -c "import json, sys; sys.exit(len(json.load(open('$T'))['runs']) < 40)"; then
      continue
    fi
    S=$(date +%s)
    timeout -s INT 2400 /work/main/.venv/bin/coral bench lowlabel --quick --seeds 20 --fold-seed $F --methods $M \
      --pretrain-epochs 64 --finetune-repeats 2 --table $T >> ${M}_split${F}.log 2>> ${M}_split${F}.err
    echo "rc $? wall $(( $(date +%s)-S )) s" >> ${M}_split${F}.err
  done
done
