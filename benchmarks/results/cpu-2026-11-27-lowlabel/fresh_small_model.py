"""The plugin test's scenario (fresh 8-filter U-Net at 64 px, phantom 2026, 4 annotated slices, one held out,
120 steps at the product's lr) over init seeds, plain and class-balanced: how often is a class left unlearned?"""
import sys, numpy as np, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from coral_core.phantom import make_phantom
from coral_core.model import UNetConfig, build_model
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.infer import segment_volume
image, labels = (v.array for v in make_phantom(2026))
n = labels.shape[0]
held_out = n // 2 + 1
annotated = [1, n // 2, n - 2]
others = [k for k in range(n) if k not in annotated + [held_out]]
def dice_per_class(pred, truth, ks):
    out = []
    for c in (1, 2, 3):
        p, t = pred[ks] == c, truth[ks] == c
        d = p.sum() + t.sum()
        out.append(2 * (p & t).sum() / d if d else float("nan"))
    return out
for seed in range(int(sys.argv[1]), int(sys.argv[2])):
    row = []
    for balance in (False, True):
        torch.manual_seed(seed)
        model = build_model(UNetConfig(base_filters=8, image_size=64, n_classes=4))
        cfg = FinetuneConfig(steps=120, device="cpu", validate_every=0, balance_classes=balance)
        out = finetune(cfg, model, [image], [labels], [annotated]).model
        pred = segment_volume(out, image, "cpu")
        train = dice_per_class(pred, labels, annotated)
        test = dice_per_class(pred, labels, others)
        row.append(f"{'balanced' if balance else 'plain'}: train {min(train):.2f} (min class) test {np.nanmean(test):.3f}")
    print(f"seed {seed}: " + " | ".join(row), flush=True)
