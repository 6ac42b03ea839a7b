import sys, numpy as np, torch
sys.path.insert(0, "benchmarks")
from field_of_view import at_field_of_view, off_centre, segment_one_way, NAMES, MM
import coral_core.infer as infer
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.model import UNetConfig, build_model
from coral_core.phantom import make_phantom
from coral_core.metrics import evaluate_segmentation
rng = np.random.default_rng(0)
tests = []
for i in range(6):
    im, lb = (v.array for v in make_phantom(2000 + i))
    tests.append([at_field_of_view(im, lb, 1.5, rng), at_field_of_view(im, lb, 2.0, rng), off_centre(im, lb, 2.0, rng)])
for k in (1, 2):
    image, labels = (v.array for v in make_phantom(1000 + k))
    slices = sorted(set(np.linspace(1, image.shape[0] - 2, 3).round().astype(int).tolist()))
    config = UNetConfig(base_filters=16, image_size=128, n_classes=4, class_names=NAMES, pixel_spacing=MM)
    torch.manual_seed(k)
    cfg = FinetuneConfig(steps=200, lr=3e-3, seed=k, device="cpu", validate_every=0)
    model = finetune(cfg, build_model(config), [image], [labels], [slices]).model
    d = lambda p, lab: evaluate_segmentation(p, lab, 4, (10.0, MM, MM))["mean_dice"]
    res = {}
    for way, sig in (("central square", None), ("squares", 0.25), ("squares", 0.125), ("squares", 0.0625)):
        if sig: infer.TILE_SIGMA = sig
        res[(way, sig)] = np.array([[d(segment_one_way(model, img, way, "cpu"), lab) for img, lab in t] for t in tests]).mean(0)
    for key, v in res.items():
        print(k, key, np.round(v, 3), flush=True)
