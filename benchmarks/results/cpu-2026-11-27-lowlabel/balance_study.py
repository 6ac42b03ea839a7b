"""Scratch study, kept as run: `coral bench lowlabel --quick` fine-tuning (same folds, draws, seeds, schedule),
with the segmentation loss patched to class-balanced cross-entropy (VARIANT balanced) or left plain.
Usage: python balance_study.py VARIANT LR [METHOD]"""
import sys, numpy as np, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from torch.nn import functional as F
import coral_core.finetune as ftm
from coral_core.lowlabel import load_labelled_cases, make_folds
from coral_core.model import UNetConfig, build_model
from coral_core.infer import segment_volume
from coral_core.metrics import evaluate_segmentation
variant, lr = sys.argv[1], float(sys.argv[2]); method = sys.argv[3] if len(sys.argv) > 3 else "random"
plain = ftm.segmentation_loss
def balanced(logits, target, dice_weight=1.0):
    logits = logits.float()
    valid = target >= 0
    counts = torch.bincount(target[valid], minlength=logits.shape[1]).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros_like(counts)).sqrt()
    ce = F.cross_entropy(logits, target, weight=w, ignore_index=-1)
    v = valid.unsqueeze(1)
    probs = logits.softmax(1) * v
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2) * v
    inter = (probs * onehot).sum((0, 2, 3))[1:]; denom = (probs + onehot).sum((0, 2, 3))[1:]
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + dice_weight * (1 - dice.mean())
if variant == "balanced": ftm.segmentation_loss = balanced
if variant == "dice3": ftm.segmentation_loss = lambda l, t, d=1.0: plain(l, t, 3.0)
cases = load_labelled_cases(None, 20)
subjects=[c.name for c in cases]; folds=make_folds(subjects,2)
mc = UNetConfig(n_classes=4, class_names=["background","c1","c2","c3"], base_filters=8, image_size=64)
res_all=[]
from coral_core.pretrain import PretrainConfig, pretrain
from coral_core.model import resize_head
for seed in range(3):
    if method != "random":
        pre = PretrainConfig(method=method, epochs=8, batch_size=32, lr=1e-3, seed=seed, device="cpu", model=mc)
        pretrained = resize_head(pretrain(pre, [c.image for c in cases]).model, 4, mc.class_names)
    for k in range(2):
        rng = np.random.default_rng([seed, k, 1])
        pool = sorted({s for s in subjects if s not in folds[k]})
        chosen = set(rng.choice(pool, size=1, replace=False).tolist())
        train=[c for c in cases if c.name in chosen]; test=[c for c in cases if c.name in folds[k]]
        if method == "random":
            torch.manual_seed(seed); init=build_model(mc)
        else:
            init = pretrained
        cfg=ftm.FinetuneConfig(steps=300, batch_size=8, lr=lr, seed=seed, device="cpu", validate_every=0, embedding_weight=0.0)
        model=ftm.finetune(cfg, init, [c.image for c in train], [c.labels for c in train], [list(range(c.image.shape[0])) for c in train]).model
        def score(cs):
            return np.mean([evaluate_segmentation(segment_volume(model, c.image, "cpu"), c.labels, 4, c.spacing, ["b","c1","c2","c3"])["mean_dice"] for c in cs])
        tr, te = score(train), score(test)
        res_all.append(te)
        print(variant, lr, method, seed, k, sorted(chosen), "train %.3f test %.3f" % (tr, te), flush=True)
print(variant, lr, method, "mean test %.3f" % np.mean(res_all), [round(x,3) for x in res_all])
