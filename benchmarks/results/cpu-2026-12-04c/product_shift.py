"""Fine-tuning shifts of up to 0.25 of the input against 0.08 at the product's settings: shift_product.txt,
paired by labelled subject (the same subject, seed and held-out subjects in each row pair).

    python product_shift.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from paired import finetune_lr_summary  # noqa: E402

# fields: init, lr, balance, zoom, layout, cohort, shift, ...
print("\n".join(finetune_lr_summary(HERE / "shift_product.txt", 6, new=0.25, old=0.08)))
