"""LP-FT with a slow encoder (the encoder frozen for the first 67 of 200 steps, then at a tenth of the rate)
against plain fine-tuning at the product's settings: lpft_product.txt, paired by labelled subject (the same
subject, seed and held-out subjects in each row pair). "frozen 67" is the recipe, "frozen 0" plain.

    python lpft_product.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from paired import finetune_lr_summary  # noqa: E402

# fields: init, lr, balance, zoom, layout, cohort, encoder, shift, frozen, ...
print("\n".join(finetune_lr_summary(HERE / "lpft_product.txt", 8, new=67, old=0, name="frozen")))
