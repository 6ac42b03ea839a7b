import sys, numpy as np, torch
sys.path.insert(0, "benchmarks")
from field_of_view import at_field_of_view, off_centre, segment_one_way, NAMES, MM
from coral_core.augment import AugmentConfig
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.model import UNetConfig, build_model
from coral_core.phantom import make_phantom
from coral_core.metrics import evaluate_segmentation
rng = np.random.default_rng(0)
tests = []
for i in range(6):
    im, lb = (v.array for v in make_phantom(2000 + i))
    tests.append([(im, lb), at_field_of_view(im, lb, 1.5, rng), at_field_of_view(im, lb, 2.0, rng), off_centre(im, lb, 2.0, rng)])
d = lambda p, lab: evaluate_segmentation(p, lab, 4, (10.0, MM, MM))["mean_dice"]
for k in (1, 2, 3):
    image, labels = (v.array for v in make_phantom(1000 + k))
    slices = sorted(set(np.linspace(1, image.shape[0] - 2, 3).round().astype(int).tolist()))
    config = UNetConfig(base_filters=16, image_size=128, n_classes=4, class_names=NAMES, pixel_spacing=MM)
    for tr in (0.08, 0.25):
        torch.manual_seed(k)
        cfg = FinetuneConfig(steps=200, lr=3e-3, seed=k, device="cpu", validate_every=0, augment=AugmentConfig(translate=tr))
        model = finetune(cfg, build_model(config), [image], [labels], [slices]).model
        for way in ("central square", "squares"):
            v = np.array([[d(segment_one_way(model, img, way, "cpu"), lab) for img, lab in t] for t in tests]).mean(0)
            print(k, tr, way, np.round(v, 3), flush=True)
