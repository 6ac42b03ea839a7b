import sys, dataclasses, numpy as np, torch
sys.path.insert(0, "benchmarks")
from field_of_view import at_field_of_view, off_centre, segment_one_way, NAMES, MM
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.model import UNetConfig, build_model
from coral_core.phantom import make_phantom
from coral_core.metrics import evaluate_segmentation
rng = np.random.default_rng(0)
tests = []
for i in range(6):
    im, lb = (v.array for v in make_phantom(2000 + i))
    tests.append(at_field_of_view(im, lb, 2.0, rng))
for k in (0, 1):
    image, labels = (v.array for v in make_phantom(1000 + k))
    slices = sorted(set(np.linspace(1, image.shape[0] - 2, 3).round().astype(int).tolist()))
    config = UNetConfig(base_filters=16, image_size=128, n_classes=4, class_names=NAMES, pixel_spacing=MM)
    torch.manual_seed(k)
    cfg = FinetuneConfig(steps=200, lr=3e-3, seed=k, device="cpu", validate_every=0)
    model = finetune(cfg, build_model(config), [image], [labels], [slices]).model
    for img, lab in tests:
        c = segment_one_way(model, img, "central square", "cpu")
        s = segment_one_way(model, img, "squares", "cpu")
        inner = np.s_[:, 64:192, 64:192]
        out_fp = np.count_nonzero(s) - np.count_nonzero(s[inner])
        d = lambda p: evaluate_segmentation(p, lab, 4, (10.0, MM, MM))["mean_dice"]
        s_in = s.copy(); s_in[:, :64] = 0; s_in[:, 192:] = 0; s_in[:, :, :64] = 0; s_in[:, :, 192:] = 0
        print(k, f"central {d(c):.3f} squares {d(s):.3f} squares-inside-only {d(s_in):.3f} fp-outside {out_fp} agree-inside {(s[inner]==c[inner]).mean():.4f}", flush=True)
