"""Does annotating the slices that "Suggest slices" proposes give a better model than other choices?

    python benchmarks/suggest_slices.py                       # 12 phantom subjects, 1 painted slice + 2 more
    python benchmarks/suggest_slices.py --subjects 4 --add 2 5
    python benchmarks/suggest_slices.py --beyond-heart 3 --strategies suggested spread suggested_heart suggested_seg

The plugin's flow: a user paints one slice (here the middle one), presses **Suggest slices**, paints what it
proposes, and fine-tunes. The suggestion is farthest-point sampling in the current model's slice embedding
(``coral_core.embedding.suggest_slices``); here the model is a CORAL encoder pretrained on 16 other phantoms
(6 epochs, as `coral demo`). The same painted first slice is completed by ``--add`` more slices chosen

* ``suggested``: by ``suggest_slices`` in that encoder's embedding (what the button does);
* ``spread``: evenly from the second slice to the last but one (what a user might do without the button,
  and what `benchmarks/finetune_lr.py` annotates);
* ``random``: drawn at random (seeded per subject);
* ``neighbours``: the slices next to the first one, alternately below and above (annotating where one already is);
* ``suggested_heart``: by ``suggest_slices`` among the slices that hold the heart only (an oracle: what keeping the
  button off slices beyond the structures could give at best);
* ``suggested_seg``: by ``suggest_slices`` among the slices where a model fine-tuned on the first painted slice alone
  (same settings) finds any foreground (what the button can do without an oracle, given a model that segments).

``--beyond-heart K`` gives every phantom (pretraining cohort, painted and held-out subjects) K more slices above
the base and K below the apex that hold no heart, as a scan reaches past the structures segmented
(``PhantomConfig.beyond_heart``); ``spread`` then spreads over the heart's slices, as a user who sees the heart would.

Each choice is fine-tuned from the same encoder at the product's settings (16 filters, 128 x 128, 200 steps,
lr 3e-3, the engine's defaults otherwise, the CORAL loss off) and scored by mean foreground Dice

* ``volume``: on the subject's whole volume as the user ends up with it, the painted slices kept as painted
  and every other slice as the model segments it (what the choice of slices is for; a choice that leaves only
  easy slices to the model gains nothing from that here);
* ``unpainted``: on the slices it did not paint (differs between choices: each leaves other slices);
* ``held out``: on three other subjects.

The summary pairs each choice with ``spread`` subject by subject (sign test); ``--summarise LOG`` prints it
again from a log of this script's rows. "unpainted" is averaged over the subjects that have unpainted slices
left (a 6-slice subject has none after 5 more).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402
from coral_core.embedding import suggest_slices  # noqa: E402
from coral_core.finetune import FinetuneConfig, finetune  # noqa: E402
from coral_core.infer import embed_volume, segment_volume  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import UNetConfig, resize_head  # noqa: E402
from coral_core.phantom import PhantomConfig, make_cohort, make_phantom  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402

NAMES = ["background", "RV", "myocardium", "LV"]
STRATEGIES = ("suggested", "spread", "random", "neighbours", "suggested_heart", "suggested_seg")


def choose(strategy: str, n_slices: int, first: int, add: int, features: np.ndarray, rng: np.random.Generator,
           heart: tuple[int, int] | None = None, candidates: list[int] | None = None) -> list[int]:
    """``first`` and ``add`` more slices of a volume of ``n_slices``, by ``strategy``; ``heart``: the first and last
    slice holding it (``spread`` spreads between them); ``candidates``: the slices the restricted suggestions
    may take."""
    lo, hi = heart if heart is not None else (0, n_slices - 1)
    if strategy == "suggested":
        more = suggest_slices(features, [first], k=add)
    elif strategy in ("suggested_heart", "suggested_seg"):
        more = suggest_slices(features, [first], k=add, candidates=candidates)
    elif strategy == "spread":
        more = [int(k) for k in np.linspace(lo + 1, hi - 1, add + 1).round()]
        # the evenly spaced positions, the one nearest the painted slice replaced by it
        more.pop(int(np.argmin([abs(k - first) for k in more])))
    elif strategy == "random":
        more = rng.choice([k for k in range(n_slices) if k != first], size=add, replace=False).tolist()
    elif strategy == "neighbours":
        more = [first + d for step in range(1, n_slices) for d in (-step, step) if 0 <= first + d < n_slices][:add]
    else:
        raise ValueError(strategy)
    chosen = sorted({first, *(int(k) for k in more)})
    while len(chosen) < add + 1:  # a choice that landed on the painted slice: the nearest free slice instead
        chosen = sorted({*chosen, min((k for k in range(n_slices) if k not in chosen), key=lambda k: abs(k - first))})
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=12, help="annotated phantoms 1000, 1001, ...")
    parser.add_argument("--add", type=int, nargs="+", default=[2], help="slices added to the painted one, one row each")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--beyond-heart", type=int, default=0, metavar="K",
                        help="slices without heart added above the base and below the apex of every phantom")
    parser.add_argument("--summarise", metavar="LOG", help="print the summary of an earlier run's output and stop")
    args = parser.parse_args()
    if args.summarise:
        summarise(read_rows(Path(args.summarise)))
        return

    t0 = time.perf_counter()
    phantoms = PhantomConfig(beyond_heart=args.beyond_heart)
    unlabelled = [img.array for img, _ in make_cohort(16, config=phantoms)]
    encoder = pretrain(PretrainConfig(method="coral", epochs=6, batch_size=32, seed=0, device=args.device,
                                      model=UNetConfig(base_filters=16, image_size=128)), unlabelled).model
    print(f"CORAL encoder pretrained on 16 phantoms in {time.perf_counter() - t0:.0f} s; {args.steps} fine-tuning steps",
          flush=True)
    print(f"{'subject':>8}{'slices':>7}{'add':>4}  {'choice':<16}{'painted':<24}{'volume':>8}{'unpainted':>10}"
          f"{'held out':>9}{'seconds':>8}")
    scores: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for s in range(args.subjects):
        image, labels = (v.array for v in make_phantom(1000 + s, config=phantoms))
        test = [make_phantom(2000 + 10 * s + i, config=phantoms) for i in range(3)]
        features = embed_volume(encoder, image, args.device)
        first = image.shape[0] // 2
        holding = [k for k in range(image.shape[0]) if labels[k].any()]
        heart = (holding[0], holding[-1])
        cfg = FinetuneConfig(steps=args.steps, lr=3e-3, seed=s, device=args.device, validate_every=0,
                             embedding_weight=0.0)
        found = None
        if "suggested_seg" in args.strategies:  # the slices a model fine-tuned on the first slice finds anything in
            torch.manual_seed(0)
            one = finetune(cfg, resize_head(encoder, 4, NAMES), [image], [labels], [[first]]).model
            found = [k for k, sl in enumerate(segment_volume(one, image, args.device)) if sl.any()]
            print(f"{1000 + s:>8}: the first slice's model finds foreground in slices {found}; the heart is in "
                  f"{heart[0]}-{heart[1]}", flush=True)
        for add in args.add:
            for strategy in args.strategies:
                candidates = holding if strategy == "suggested_heart" else found
                painted = choose(strategy, image.shape[0], first, add, features, np.random.default_rng(s), heart,
                                 candidates)
                t = time.perf_counter()
                torch.manual_seed(0)
                model = finetune(cfg, resize_head(encoder, 4, NAMES), [image], [labels], [painted]).model
                pred = segment_volume(model, image, args.device)
                unpainted = [k for k in range(image.shape[0]) if k not in painted]
                own = evaluate_segmentation(pred[unpainted], labels[unpainted], 4)["mean_dice"]
                pred[painted] = labels[painted]  # what the user keeps: their painted slices, the model's elsewhere
                volume = evaluate_segmentation(pred, labels, 4)["mean_dice"]
                held = float(np.mean([evaluate_segmentation(segment_volume(model, img.array, args.device), lab.array, 4)
                                      ["mean_dice"] for img, lab in test]))
                scores.setdefault((add, strategy), []).append((volume, own, held))
                print(f"{1000 + s:>8}{image.shape[0]:>7}{add:>4}  {strategy:<16}{str(painted):<24}{volume:>8.3f}"
                      f"{own:>10.3f}{held:>9.3f}{time.perf_counter() - t:>8.0f}", flush=True)

    summarise(scores)


ROW = re.compile(r"^\s*(\d+)\s+\d+\s+(\d+)\s+(\w+)\s+\[[\d, ]*\]\s+(\S+)\s+(\S+)\s+(\S+)\s+\d+\s*$")


def read_rows(log: Path) -> dict:
    """The scores of a log of this script's per-subject rows, keyed as ``main`` keeps them."""
    scores: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for line in log.read_text().splitlines():
        m = ROW.match(line)
        if m:
            scores.setdefault((int(m[2]), m[3]), []).append((float(m[4]), float(m[5]), float(m[6])))
    return scores


def summarise(scores: dict) -> None:
    """Each choice's mean scores, and its difference from ``spread`` subject by subject."""
    n = len(next(iter(scores.values())))
    print(f"\n{n} subjects, the middle slice painted first; mean (and vs spread: mean difference, up in, sign-test p)")
    for (add, strategy), rows in scores.items():
        rows = np.array(rows)
        has_own = ~np.isnan(rows[:, 1])
        line = (f"add {add}  {strategy:<16}volume {rows[:, 0].mean():.3f}  unpainted {rows[has_own, 1].mean():.3f}"
                f"{'' if has_own.all() else f' ({has_own.sum()})'}  held out {rows[:, 2].mean():.3f}")
        if strategy != "spread" and (add, "spread") in scores:
            ref = np.array(scores[(add, "spread")])
            parts = []
            for col, name in ((0, "volume"), (2, "held out")):
                d = rows[:, col] - ref[:, col]
                up, down = int((d > 0).sum()), int((d < 0).sum())
                parts.append(f"{name} {d.mean():+.3f} ({up}/{len(d)}, p {sign_test_p(up, down):.2g})")
            line += "   vs spread: " + ", ".join(parts)
        print(line)


if __name__ == "__main__":
    main()
