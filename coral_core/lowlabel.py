"""The low-annotation benchmark: does pretraining help when only M volumes are labelled?

Protocol (after the CORAL, GCL and PCL papers' ACDC experiments, with our own code):

1. Every method pretrains the encoder on the images of the whole cohort, labels unused, with
   the same model, augmentation, batch size, learning rate and number of steps. ``random``
   skips pretraining.
2. Subjects are split into K folds, one split for every run (``fold_seed``). For fold k the test
   set is fold k; M labelled subjects are drawn from the other folds (a fresh draw per seed). The
   model is fine-tuned on every slice of those M volumes, again with one schedule for every method.
3. Each test volume is segmented slice by slice (a 2-D model); Dice and HD95 are computed per
   foreground class on the volume and averaged over the classes present, then over the test
   volumes. A cell of the table is the mean and standard deviation over folds x seeds.

The pretraining seed is the run seed, so a seed repeats the whole pipeline, not only the
fine-tuning.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from coral_core.augment import AugmentConfig
from coral_core.errors import MissingStructureError, UserError, naming
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.infer import segment_volume
from coral_core.levers import Levers
from coral_core.metrics import dice_per_class, evaluate_segmentation, mean_over_present
from coral_core.model import UNetConfig, build_model, resize_head
from coral_core.pretrain import PretrainConfig, pretrain
from coral_core.training import check_optimiser_settings

__all__ = [
    "LOWLABEL_METHODS",
    "LabelledCase",
    "LowLabelConfig",
    "LowLabelResult",
    "labelled_slices",
    "load_labelled_cases",
    "load_cine_frames",
    "make_folds",
    "run_lowlabel",
    "format_run_counts",
    "format_table",
    "format_pooled",
    "paired_differences",
    "format_paired",
    "format_paired_by_seed",
    "best_checkpoint_runs",
    "best_checkpoint_summary",
    "format_best_checkpoint",
    "EmbeddingFigureConfig",
    "run_embedding_figure",
]

LOWLABEL_METHODS = ("random", "simclr", "gcl", "pcl", "coral", "ral", "oal")
# Fine-tuning seed of repeat r of a run with seed s: s + r * this (far from any run's own seed).
FINETUNE_REPEAT_SEED_STEP = 1_000_003


@dataclass
class LabelledCase:
    name: str
    image: np.ndarray  # (z, y, x)
    labels: np.ndarray  # (z, y, x) uint8 classes
    spacing: tuple[float, float, float]  # per array axis, mm


MOST_RUNS = 100_000  # fine-tuning runs one benchmark may ask for: about four days of a GPU at 3-4 s a run


@dataclass
class LowLabelConfig:
    """One benchmark run. The defaults are the full protocol; :meth:`quick` fits a 2-core CPU."""

    methods: tuple[str, ...] = LOWLABEL_METHODS
    labeled: tuple[int, ...] = (1, 2, 6)
    folds: int = 5
    # Seed of the one split into folds that every run shares (make_folds); the published protocol keeps one.
    # Another seed gives another split: the split is a random factor of its own, which the seeds, sharing it,
    # do not average out (docs/results.md, "Which split").
    fold_seed: int = 0
    seeds: int = 3
    image_size: int = 128
    # In-plane mm per pixel: every case resampled to it and centre-cropped or padded to image_size, as the
    # published code prepares ACDC (1.25 mm, 352 x 352), and scored there. None: each slice resized whole
    # to image_size and scored at the volume's own resolution (how the product's model sees a scan).
    pixel_spacing: float | None = None
    base_filters: int = 48
    pretrain_epochs: int = 50
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    finetune_steps: int = 1000
    finetune_batch: int = 16
    finetune_lr: float = 1e-2  # chosen on the quick setting, where 1e-3 left random init untrained (docs/results.md)
    # FinetuneConfig.balance_classes. Plain cross-entropy left classes unlearned on the labelled volume
    # itself in 3 of the 12 quick runs checked (a fine-tuning failure, not the encoder's); balanced,
    # in none of 24 (docs/results.md).
    finetune_balance_classes: bool = True
    # FinetuneConfig.freeze_encoder: fine-tune the decoder and head only, to see what each encoder
    # holds by itself (docs/results.md, "Looking for the cause").
    finetune_freeze_encoder: bool = False
    # FinetuneConfig.encoder_lr_scale: the encoder fine-tuned at this fraction of the learning rate,
    # between frozen and fully fine-tuned (docs/results.md).
    finetune_encoder_lr_scale: float = 1.0
    # FinetuneConfig.encoder_frozen_steps: the encoder frozen for this many first fine-tuning steps, then
    # trained with the rest (linear probing, then fine-tuning), for every method alike.
    finetune_encoder_frozen_steps: int = 0
    # Fine-tunings per run, each with its own fine-tuning seed (the first with the run's seed, as with 1),
    # whose Dice are averaged: on two CPUs the same 40 quick runs gave uncorrelated paired differences, so
    # most of a run's spread is its fine-tuning trajectory, which more fine-tunings average out
    # (docs/results.md, "Another machine's rounding"). The pretraining is shared; the cost is R fine-tunings.
    finetune_repeats: int = 1
    # FinetuneConfig.augment.enabled: the fine-tuning's rotation, scaling, gamma, contrast and noise
    # (the pretraining augments either way). Off, random init has only the labelled volumes' own
    # appearance to learn from (docs/results.md, "More checks of the cause").
    finetune_augment: bool = True
    # Annotated slices per labelled volume, evenly spaced through it (labelled_slices); 0: all of them.
    # 3 is what the product's users paint before their first fine-tuning.
    finetune_slices: int = 0
    # AugmentConfig.scale of the fine-tuning: the zoom range of the labelled slices. The phantoms' hearts
    # differ up to 2.9-fold in area, and one labelled subject's zoomed by 0.85-1.15 covers part of that
    # (docs/results.md, "More checks of the cause").
    finetune_scale: tuple[float, float] = (0.85, 1.15)
    # AugmentConfig.scale of the pretraining, for every method alike.
    pretrain_scale: tuple[float, float] = (0.85, 1.15)
    # AugmentConfig.translate of the fine-tuning: the largest shift, a fraction of the input. The product's
    # fine-tuning shifts by up to 0.25 (coral_core.augment.FINETUNE_TRANSLATE); 0.08 keeps the tables comparable.
    finetune_shift: float = 0.08
    # Weight of the CORAL loss on every subject's slices (the unlabelled cohort, as pretrained on) added
    # to the fine-tuning loss, for every method (random init starts from a random direction): whether
    # the unlabelled subjects, kept in view while fine-tuning, supply the anatomy one labelled volume
    # lacks (docs/results.md). 0: off, the same plain fine-tuning for every method.
    finetune_cohort_weight: float = 0.0
    # Unlabelled volumes beyond the cohort that join every method's pretraining only (never fine-tuned
    # on or scored): how many run_lowlabel was given (`--pretrain-phantom N`). Whether a larger
    # unlabelled cohort, with the same labelled subjects and test folds, changes what pretraining gives.
    pretrain_extra: int = 0
    device: str = "auto"
    # Levers.cpu_bf16 for every stage. False: float32 on the CPU, as every table in docs/results.md was
    # measured. In bf16, CORAL's paired lead over random init in the quick setting was +0.019 (6/6)
    # against float32's +0.025 (6/6), and +0.012 before the projection head ran in float32.
    cpu_bf16: bool | None = False
    # Processes that run (seed, method) units side by side, each with its share of the CPU threads
    # (on one GPU they share it). Not part of the protocol: the runs are those of one process.
    workers: int = 1
    # Score the test fold every this many fine-tuning steps too (0: only at the end), to see what the
    # published code's choice of the epoch that scored best on the held-out fold would report (runs'
    # "curve"). Not part of the protocol: a run's own Dice stays the one at the end of its schedule.
    score_every: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.labeled = tuple(int(m) for m in self.labeled)
        unknown = [m for m in self.methods if m not in LOWLABEL_METHODS]
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(LOWLABEL_METHODS)}")
        if not self.methods or not self.labeled:
            raise UserError("give at least one method and one --labeled count")
        if min(self.labeled) < 1:
            raise UserError("--labeled counts must be at least 1")
        if self.folds < 2 or self.seeds < 1:
            raise UserError("the benchmark needs --folds >= 2 and --seeds >= 1")
        runs = self.seeds * len(self.methods) * len(self.labeled) * self.folds
        if runs > MOST_RUNS:  # listing them alone would fill the memory (--seeds 2147483647)
            counts = " x ".join(f"{n} {what}{'' if n == 1 else 's'}" for n, what in (
                (self.seeds, "seed"), (len(self.methods), "method"), (len(self.labeled), "labelled count"),
                (self.folds, "fold")))
            raise UserError(f"{counts} make {runs:,} fine-tuning runs, more than the benchmark takes "
                            f"({MOST_RUNS:,}; the full protocol is 315); give fewer --seeds, --folds or methods")
        if self.workers < 1:
            raise UserError("--workers must be at least 1")
        if self.fold_seed < 0:
            raise UserError("--fold-seed must be 0 (the default split) or more")
        for name in ("finetune_scale", "pretrain_scale"):
            zoom = tuple(float(x) for x in getattr(self, name))
            if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
                raise UserError(f"--{name.replace('_', '-')} must be LOW,HIGH with 0 < LOW <= HIGH, e.g. 0.7,1.4")
            setattr(self, name, zoom)
        if not 0 <= self.finetune_shift <= 0.5:
            raise UserError("--finetune-shift must be a fraction of the input between 0 and 0.5, e.g. 0.25")
        if self.score_every < 0:
            raise UserError("--score-every must be 0 (only at the end) or a number of steps")
        if self.finetune_cohort_weight < 0:
            raise UserError("--finetune-cohort-weight must be 0 (off) or more")
        check_optimiser_settings(self.finetune_lr, 0.0, "--finetune-lr")
        check_optimiser_settings(self.pretrain_lr, 0.0, "--pretrain-lr")
        if self.pretrain_batch < 2:
            raise UserError("--pretrain-batch must be at least 2 slices (the objectives compare slices within a batch)")
        if self.finetune_steps < 1 or self.pretrain_epochs < 1:
            raise UserError("the benchmark needs --finetune-steps >= 1 and --pretrain-epochs >= 1")
        if not 0 < self.finetune_encoder_lr_scale < float("inf"):
            raise UserError("--encoder-lr-scale must be above 0 (use --freeze-encoder to keep the encoder as it is)")
        if self.finetune_lr * self.finetune_encoder_lr_scale > 1:
            raise UserError(f"--encoder-lr-scale {self.finetune_encoder_lr_scale:g}: the encoder's learning rate "
                            f"(--finetune-lr {self.finetune_lr:g} times it) would be above 1; give a smaller scale")
        if self.pretrain_extra < 0:
            raise UserError("--pretrain-phantom must be 0 (none) or more")
        if not 0 <= self.finetune_encoder_frozen_steps < self.finetune_steps:
            raise UserError("--freeze-encoder-steps must be 0 (off) or fewer than the fine-tuning steps")
        if self.finetune_repeats < 1:
            raise UserError("--finetune-repeats must be 1 or more")
        if self.finetune_slices < 0:
            raise UserError("--labeled-slices must be 0 (every slice) or more")
        if self.pixel_spacing is not None and not 0 < self.pixel_spacing < float("inf"):
            raise UserError("--pixel-spacing must be a size in mm above 0, e.g. 1.25")
        if self.base_filters < 1 or self.image_size < 16 or self.image_size % 16:
            raise UserError("--base-filters must be at least 1 and --image-size a positive multiple of 16")

    @classmethod
    def quick(cls, **overrides) -> "LowLabelConfig":
        """A small model at 64 x 64 with short schedules: minutes on a laptop CPU.

        3 seeds in 2 processes: on this project's 2-core CPU that is 6 paired runs per method in
        less time (501 s) than 4 took in one process (545 s), where the small model uses a second
        thread poorly. With 4 runs, rounding alone (one thread per process instead of two) had moved
        CORAL's lead over random init from +0.028 to +0.009 (docs/results.md)."""
        base = dict(
            labeled=(1,), folds=2, seeds=3, workers=2, image_size=64, base_filters=8,
            pretrain_epochs=8, pretrain_batch=32, finetune_steps=300, finetune_batch=8,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LowLabelResult:
    rows: list[dict]  # one per (method, labeled): mean and std over folds x seeds
    runs: list[dict]  # one per (method, labeled, fold, seed)
    config: dict
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


def load_labelled_cases(data: str | None, phantom: int, seed: int = 0, phantom_config=None,
                        label_values: list[int] | None = None,
                        structures: list[str] | None = None) -> list[LabelledCase]:
    """Labelled subjects from a dataset folder (``data``: ACDC, imagesTr/labelsTr, or images beside
    their label files) or ``phantom`` synthetic ones, made with ``phantom_config`` (a
    :class:`~coral_core.phantom.PhantomConfig`; its defaults if None). ``label_values``: the values
    the folder's label files use for classes 1, 2, ... (:func:`coral_core.data.label_map`); ``structures``: the
    names of the classes to take (RT structure set ROIs, SEG segments, named classes), as classes 1, 2, ...
    (:func:`coral_core.volume.load_labels_like`).

    For ACDC every labelled frame (end-diastole and end-systole) is a case of its patient; the
    folds split patients, never frames of one patient. A case whose labels lack one of ``structures`` is left out
    with a warning.
    """
    from coral_core.data import discover_volumes, label_map
    from coral_core.phantom import make_cohort
    from coral_core.volume import load_labels_like, load_volume

    cases: list[LabelledCase] = []
    incomplete: list[MissingStructureError] = []
    if data:
        for case in discover_volumes([data]):
            if case.label is None:
                continue
            image = load_volume(case.image)
            try:
                labels = load_labels_like(case.label, image, structures)  # a DICOM SEG: placed on the image's grid
            except MissingStructureError as exc:  # a case without one of the structures: left out, as coral finetune does
                incomplete.append(exc)
                continue
            if image.shape != labels.shape:
                raise UserError(f"{case.label}: labels of shape {labels.shape} do not match {case.image} of shape {image.shape}")
            # classes as uint8: an eighth of int64's memory, for a cohort held whole (CT-sized scans add up)
            classes = label_map(labels.array, case.label, label_values)
            cases.append(LabelledCase(case.subject, image.array, classes, image.spacing))
        if not cases and incomplete:
            raise UserError(f"{incomplete[0]}, nor does any other case; give names that every case holds (NAME|OTHER "
                            "for a structure named two ways)")
        for exc in incomplete:
            warnings.warn(f"{exc}; the case is left out", stacklevel=2)
        if not cases:
            raise UserError(f"{data}: no image with a label file found; expected an ACDC folder, imagesTr and labelsTr folders, "
                            "or files such as ct_1001_image.nii.gz and ct_1001_label.nii.gz side by side")
    for i, (img, lab) in enumerate(make_cohort(phantom, seed=seed, config=phantom_config) if phantom else []):
        cases.append(LabelledCase(f"phantom{seed + i}", img.array, lab.array.astype(np.uint8), img.spacing))
    if not cases:
        raise UserError("no data; give --data DIR or --phantom N")
    return cases


def load_cine_frames(data: str, image_size: int, pixel_spacing: float | None = None) -> list[torch.Tensor]:
    """Every frame of the 4-D cine files in a dataset folder (ACDC's ``patientXXX_4d.nii.gz``), each
    prepared at ``image_size`` (:func:`~coral_core.data.resize_slices`; at ``pixel_spacing`` mm per
    pixel first if given, :func:`~coral_core.data.at_pixel_spacing`), except those a labelled case
    already holds: ACDC's ``patientXXX_frameYY`` is frame YY of the cine, counted from 1. With the
    labelled cases, that is every cine frame once: the published methods' unlabelled pretraining set
    (PCL's and CORAL's code pretrain on ACDC's cine frames, about 30 a patient)."""
    from coral_core.data import _ACDC_FRAME, at_pixel_spacing, discover_volumes, resize_slices
    from coral_core.volume import frame_count, load_frames

    held: dict[str, set[int]] = {}  # per subject, the frame numbers of its labelled cases
    for case in discover_volumes([data]):
        m = _ACDC_FRAME.match(case.image.name)
        if m and case.label is not None:
            held.setdefault(m.group("subject"), set()).add(int(m.group("frame")))
    frames: list[torch.Tensor] = []
    for case in discover_volumes([data], all_frames=True):
        movie = load_frames(case.image) if case.frames and frame_count(case.image) > 1 else []  # header first
        if len(movie) > 1:
            skip = held.get(case.subject, set())
            with naming(case.image):
                frames.extend(resize_slices(at_pixel_spacing(f.array, f.spacing, pixel_spacing, image_size)[0]
                                            if pixel_spacing else f.array, image_size)
                              for t, f in enumerate(movie) if t + 1 not in skip)
    if not frames:
        raise UserError(f"{data}: holds no 4-D cine files (ACDC: patientXXX/patientXXX_4d.nii.gz) to pretrain on; "
                        "leave --pretrain-cine out")
    return frames


def at_pixel_spacing_cases(cases: list[LabelledCase], mm: float, size: int) -> list[LabelledCase]:
    """Each case resampled in-plane to ``mm`` per pixel and centre-cropped or padded to ``size``
    (:func:`~coral_core.data.at_pixel_spacing`), its spacing updated. A crop that cuts labelled
    anatomy away is refused, naming the case: the benchmark would score another task."""
    from coral_core.data import at_pixel_spacing

    out = []
    for case in cases:
        with naming(case.name):
            image, labels, spacing, cut = at_pixel_spacing(case.image, case.spacing, mm, size, case.labels)
        if cut:
            field_mm = size * mm
            raise UserError(f"{case.name}: at {mm:g} mm per pixel a {size} x {size} crop ({field_mm:g} mm) cuts away "
                            f"{cut} labelled voxels; raise --image-size or --pixel-spacing")
        out.append(LabelledCase(case.name, image, labels, spacing))
    return out


def labelled_slices(n_slices: int, k: int) -> list[int]:
    """The ``k`` slices of an ``n_slices`` stack that count as annotated: one from the middle of each
    of ``k`` equal stretches from base to apex (for 10 slices and k = 3: 1, 5, 8); every slice when
    ``k`` is 0 or at least ``n_slices``."""
    if k <= 0 or k >= n_slices:
        return list(range(n_slices))
    return [int((i + 0.5) * n_slices / k) for i in range(k)]


def make_folds(subjects: list[str], k: int, seed: int = 0) -> list[list[str]]:
    """K folds of distinct subjects, shuffled once with ``seed`` and dealt round robin."""
    unique = sorted(set(subjects))
    if len(unique) < k:
        raise UserError(f"{len(unique)} subjects cannot make {k} folds; lower --folds or add subjects")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [[unique[j] for j in order[i::k]] for i in range(k)]


def _score(model, cases: list[LabelledCase], n_classes: int, device, levers: Levers,
           hd95: bool = True) -> tuple[float, float, float, list[float]]:
    """(Dice, HD95, pooled Dice, each volume's Dice) on the test cases. Dice and HD95: per volume, averaged
    over the classes present, then over the volumes. Pooled Dice: each class's overlap and sizes summed over every test
    slice before dividing, then averaged over the classes, as the published code (PCL's, which CORAL's
    builds on) scores a fold: large volumes weigh more, and a class missed in one small volume costs less.
    ``hd95`` False: HD95 is not computed (NaN), the Dice are the same."""
    dice, hd = [], []
    overlap, sizes = np.zeros(n_classes), np.zeros(n_classes)
    for case in cases:
        pred = segment_volume(model, case.image, device, levers=levers)
        if hd95:
            m = evaluate_segmentation(pred, case.labels, n_classes, case.spacing)
            dice.append(m["mean_dice"])
            hd.append(m["mean_hd95"])
        else:
            dice.append(mean_over_present(dice_per_class(pred, case.labels, n_classes)))
            hd.append(float("nan"))
        for c in range(1, n_classes):
            p, t = pred == c, case.labels == c
            overlap[c] += np.count_nonzero(p & t)
            sizes[c] += np.count_nonzero(p) + np.count_nonzero(t)
    present = sizes[1:] > 0
    pooled = float(np.mean(2 * overlap[1:][present] / sizes[1:][present])) if present.any() else float("nan")
    return (float(np.nanmean(dice)), float(np.nanmean(hd)) if np.isfinite(hd).any() else float("nan"), pooled,
            [float(d) for d in dice])


# What a run's result depends on, besides its own (method, labelled count, fold, seed): a table may
# be continued only by a run that agrees on all of these (the methods, seeds and counts may grow).
PROTOCOL_FIELDS = (
    "source", "subjects", "cases", "n_classes", "folds", "image_size", "base_filters", "pretrain_epochs",
    "pretrain_batch", "pretrain_lr", "finetune_steps", "finetune_batch", "finetune_lr", "finetune_balance_classes",
    "compute", "finetune_freeze_encoder", "finetune_augment", "finetune_slices", "finetune_scale", "pretrain_scale",
    "finetune_cohort_weight", "pretrain_extra", "finetune_encoder_lr_scale", "finetune_repeats",
    "pixel_spacing", "finetune_shift", "finetune_encoder_frozen_steps", "fold_seed",
)
# Protocol fields added after tables were first written, with the value those tables had.
_FIELDS_ADDED_LATER = {"finetune_freeze_encoder": False, "finetune_augment": True, "finetune_slices": 0,
                       "finetune_scale": [0.85, 1.15], "pretrain_scale": [0.85, 1.15], "finetune_cohort_weight": 0.0,
                       "pretrain_extra": 0, "finetune_encoder_lr_scale": 1.0, "finetune_repeats": 1,
                       "pixel_spacing": None, "finetune_shift": 0.08, "finetune_encoder_frozen_steps": 0,
                       "fold_seed": 0}


def protocol_difference(old: dict, new: dict) -> str | None:
    """The first protocol field on which two tables' configs differ, described; None if none."""
    for key in PROTOCOL_FIELDS:
        if key not in old and key not in _FIELDS_ADDED_LATER:
            return f"it does not record {key!r} (written by an older version)"
        value = old.get(key, _FIELDS_ADDED_LATER.get(key))
        if value != new[key]:
            return f"its {key} is {value!r}, this run's {new[key]!r}"
    return None


def _run_key(run: dict) -> tuple:
    return run["method"], run["labeled"], run["fold"], run["seed"]


def run_lowlabel(
    cfg: LowLabelConfig,
    cases: list[LabelledCase],
    progress: Callable[[str], None] | None = None,
    source: str = "",
    earlier: dict | None = None,
    earlier_name: str = "the earlier table",
    on_run: Callable[["LowLabelResult"], None] | None = None,
    pretrain_extra: list[np.ndarray] | None = None,
) -> LowLabelResult:
    """Run the whole benchmark; ``progress(text)`` is told each stage as it starts.

    ``pretrain_extra``: more (z, y, x) volumes, without labels, that join every method's pretraining
    and nothing else; ``cfg.pretrain_extra`` must be their number.
    With ``cfg.pixel_spacing`` the cases are brought to it (:func:`at_pixel_spacing_cases`); the
    extra volumes must already be (the caller knows their spacing).

    ``source`` names the cohort (a folder, or "N phantom subjects") in the config. ``earlier``, a
    table this function returned before (as JSON), is continued: its runs are kept and not run
    again, and a method whose runs for a seed are all there is not pretrained again. It must come
    from the same protocol (:data:`PROTOCOL_FIELDS`), else a UserError names ``earlier_name`` and
    the difference. ``on_run(result)`` is called after every new run with everything so far.
    """
    from coral_core.device import cpu_name, resolve_device

    say = progress or (lambda text: None)
    pretrain_extra = list(pretrain_extra or [])
    if len(pretrain_extra) != cfg.pretrain_extra:
        raise ValueError(f"cfg.pretrain_extra is {cfg.pretrain_extra} but {len(pretrain_extra)} extra volumes were given")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.pixel_spacing:  # a no-op for cases already at that spacing and size
        cases = at_pixel_spacing_cases(cases, cfg.pixel_spacing, cfg.image_size)
    n_classes = int(max(c.labels.max() for c in cases)) + 1
    if n_classes < 2:
        raise UserError("the labels hold only background; the benchmark needs foreground classes")
    subjects = [c.name for c in cases]
    folds = make_folds(subjects, cfg.folds, cfg.fold_seed)
    n_train = len(set(subjects)) - max(len(f) for f in folds)
    too_many = [m for m in cfg.labeled if m > n_train]
    if too_many:
        raise UserError(f"--labeled {too_many[0]} exceeds the {n_train} training subjects of a fold; lower it or add subjects")

    model_cfg = UNetConfig(
        n_classes=n_classes, class_names=["background"] + [f"class {c}" for c in range(1, n_classes)],
        base_filters=cfg.base_filters, image_size=cfg.image_size,
    )
    levers = Levers(cpu_bf16=cfg.cpu_bf16)
    bf16 = device.type == "cuda" or levers.cpu_bf16_on(device)  # CUDA always trains and infers under autocast
    config = cfg.to_dict() | {"subjects": len(set(subjects)), "cases": len(cases), "device": str(device),
                              "n_classes": n_classes, "cpu_bf16": levers.cpu_bf16_on(device), "source": source,
                              "compute": "bf16" if bf16 else "float32",
                              # lists, as a table read back from JSON has them
                              "finetune_scale": list(cfg.finetune_scale), "pretrain_scale": list(cfg.pretrain_scale)}
    # the CPU's model too: another model rounds float32 differently (docs/results.md, "Another machine's rounding")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"
    runs: list[dict] = []
    timings: dict[str, float] = {}
    earlier_seconds = 0.0
    if earlier is not None:
        difference = protocol_difference(earlier.get("config", {}), config)
        if difference:
            raise UserError(f"{earlier_name} comes from another protocol ({difference}); give another --table file")
        runs = list(earlier.get("runs", []))
        timings = dict(earlier.get("timings", {}))
        earlier_seconds = float(earlier.get("seconds", 0.0))
        config["methods"] = tuple(dict.fromkeys([*earlier["config"]["methods"], *cfg.methods]))
        config["labeled"] = tuple(sorted({*earlier["config"]["labeled"], *cfg.labeled}))
        config["seeds"] = max(int(earlier["config"]["seeds"]), cfg.seeds)
    done = {_run_key(r) for r in runs}

    def result() -> LowLabelResult:
        return LowLabelResult(_rows(runs, config["methods"], config["labeled"]), runs, config,
                              earlier_seconds + time.perf_counter() - t0, timings)

    units = []  # (seed, method, the (M, fold) pairs still to run): each pretrains once, then fine-tunes
    for seed in range(cfg.seeds):
        for method in cfg.methods:
            todo = [(m, k) for m in cfg.labeled for k in range(cfg.folds) if (method, m, k, seed) not in done]
            if todo:
                units.append((seed, method, todo))
    work = _Work(cfg, cases, folds, model_cfg, levers, device_name, pretrain_extra)
    in_workers = cfg.workers > 1 and len(units) > 1
    threads = max(1, torch.get_num_threads() // cfg.workers) if in_workers else torch.get_num_threads()
    on_cpu = [r for r in runs if str(r.get("device", "")).startswith("cpu")]
    earlier_threads = sorted({r["threads"] for r in on_cpu if "threads" in r})
    if units and device.type == "cpu" and earlier_threads and earlier_threads != [threads]:
        # On the CPU the thread count changes the order of sums, and rounding alone moved single runs by
        # up to 0.058 Dice (docs/results.md): such a table mixes two roundings.
        say(f"note: the table's runs used {', '.join(map(str, earlier_threads))} CPU thread(s) per process, the new "
            f"ones use {threads}; the rounding differs, so runs are comparable only in the mean")
    earlier_cpus = sorted({r["device"] for r in on_cpu if r["device"] != "cpu"})  # "cpu": written before 2026-11-28 evening
    if units and device.type == "cpu" and earlier_cpus and earlier_cpus != [device_name]:
        say(f"note: the table's runs ran on {', '.join(earlier_cpus)}, the new ones on {device_name}; another CPU "
            "model rounds differently, so runs are comparable only in the mean")
    order = {m: i for i, m in enumerate(config["methods"])}

    def take(run: dict, spent: dict[str, float]) -> None:
        runs.append(run)
        runs.sort(key=lambda r: (r["seed"], order.get(r["method"], len(order)), r["labeled"], r["fold"]))
        for key, seconds in spent.items():
            timings[key] = timings.get(key, 0.0) + seconds
        say(f"seed {run['seed']}: {run['method']}, {run['labeled']} labelled, fold {run['fold'] + 1}: Dice {run['dice']:.3f}")
        if on_run is not None:
            on_run(result())

    if not in_workers:
        for unit in units:
            _run_unit(work, *unit, take, say)
    else:
        _run_in_workers(work, units, cfg.workers, take, say)
    return result()


@dataclass
class _Work:
    """What every unit of the benchmark needs (sent once to each worker process)."""

    cfg: LowLabelConfig
    cases: list[LabelledCase]
    folds: list[list[str]]
    model_cfg: UNetConfig
    levers: Levers
    device_name: str
    # unlabelled volumes for pretraining only: (S, H, W) arrays, or (S, 1, h, w) tensors already prepared
    # by resize_slices (cine frames)
    pretrain_extra: list[np.ndarray | torch.Tensor] = field(default_factory=list)

    def __getstate__(self) -> dict:
        # Sent to worker processes: tensors go as NumPy arrays, which the pipe copies. torch would pass them
        # through shared memory, which containers often limit to 64 MB (ACDC's cine frames take about 2 GB).
        state = dict(self.__dict__)
        state["pretrain_extra"] = [("prepared", v.numpy()) if isinstance(v, torch.Tensor) else v
                                   for v in self.pretrain_extra]
        return state

    def __setstate__(self, state: dict) -> None:
        state["pretrain_extra"] = [torch.from_numpy(v[1]) if isinstance(v, tuple) else v
                                   for v in state["pretrain_extra"]]
        self.__dict__.update(state)


def _run_unit(work: _Work, seed: int, method: str, todo: list, take, say) -> None:
    """Pretrain ``method`` with ``seed`` (random: a fresh model), then fine-tune and score it for
    each (M, fold) in ``todo``; ``take(run, seconds spent)`` receives each run as it is scored."""
    from coral_core.device import resolve_device

    cfg, cases, model_cfg, levers = work.cfg, work.cases, work.model_cfg, work.levers
    device = resolve_device(cfg.device)
    subjects = [c.name for c in cases]
    t = time.perf_counter()
    if method == "random":
        torch.manual_seed(seed)  # as pretrain() seeds its fresh model
        init = build_model(model_cfg)
    else:
        say(f"seed {seed}: pretrain {method}")
        pre_cfg = PretrainConfig(
            method=method, epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch,
            lr=cfg.pretrain_lr, seed=seed, device=cfg.device, model=model_cfg, levers=levers,
            augment=AugmentConfig(scale=cfg.pretrain_scale),
        )
        init = resize_head(pretrain(pre_cfg, [c.image for c in cases] + work.pretrain_extra).model, model_cfg.n_classes,
                           model_cfg.class_names)
    spent = {f"pretrain {method}": time.perf_counter() - t}
    for m, k in todo:
        test_subjects = work.folds[k]
        rng = np.random.default_rng([seed, k, m])
        pool = sorted({s for s in subjects if s not in test_subjects})
        chosen = set(rng.choice(pool, size=m, replace=False).tolist())
        train = [c for c in cases if c.name in chosen]
        test = [c for c in cases if c.name in test_subjects]
        say(f"seed {seed}: fine-tune {method} on {m} labelled, fold {k + 1}/{cfg.folds}")
        scores = []  # (dice, hd95, pooled) of each fine-tuning of this run
        case_scores = []  # each test volume's Dice, for each fine-tuning
        curve = []  # [step, dice, pooled] of the first fine-tuning's checkpoints, with cfg.score_every
        spent.update({f"finetune {method}": 0.0, f"score {method}": 0.0})

        def probe(step: int, model) -> None:
            t = time.perf_counter()
            dice, _, pooled, _ = _score(model, test, model_cfg.n_classes, device, levers, hd95=False)
            curve.append([step, dice, pooled])
            seconds = time.perf_counter() - t  # scoring, not fine-tuning
            spent[f"score {method}"] += seconds
            spent[f"finetune {method}"] -= seconds

        for repeat in range(cfg.finetune_repeats):
            t = time.perf_counter()
            ft_cfg = FinetuneConfig(
                steps=cfg.finetune_steps, batch_size=cfg.finetune_batch, lr=cfg.finetune_lr,
                # the first fine-tuning takes the run's seed, so one repeat is the plain run
                seed=seed + FINETUNE_REPEAT_SEED_STEP * repeat, device=cfg.device, validate_every=0,
                balance_classes=cfg.finetune_balance_classes,
                # the same fine-tuning for every method: no extra loss for CORAL unless every method gets it
                embedding_weight=cfg.finetune_cohort_weight,
                freeze_encoder=cfg.finetune_freeze_encoder, encoder_lr_scale=cfg.finetune_encoder_lr_scale,
                encoder_frozen_steps=cfg.finetune_encoder_frozen_steps,
                levers=levers, augment=AugmentConfig(enabled=cfg.finetune_augment, scale=cfg.finetune_scale,
                                                     translate=cfg.finetune_shift),
            )
            model = finetune(
                ft_cfg, init, [c.image for c in train], [c.labels for c in train],
                [labelled_slices(c.image.shape[0], cfg.finetune_slices) for c in train],
                unlabelled=[c.image for c in cases if c.name not in chosen] if cfg.finetune_cohort_weight else None,
                probe=probe if repeat == 0 else None, probe_every=cfg.score_every,
            ).model
            spent[f"finetune {method}"] += time.perf_counter() - t
            t = time.perf_counter()
            *score, by_case = _score(model, test, model_cfg.n_classes, device, levers)
            scores.append(score)
            case_scores.append(by_case)
            spent[f"score {method}"] += time.perf_counter() - t
        dice, hd95, pooled = (float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                              for v in np.array(scores, dtype=float).T)
        run = {"method": method, "labeled": m, "fold": k, "seed": seed, "dice": dice, "hd95": hd95,
               "dice_pooled": pooled, "train": sorted(chosen), "test": sorted(test_subjects),
               "device": work.device_name, "threads": torch.get_num_threads()}
        # each test volume's Dice (mean over the fine-tunings), in the order of the cases: which subjects a
        # method helps, and how a lead splits over the pairs of labelled and test subjects
        with warnings.catch_warnings():  # a volume without foreground in any fine-tuning stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            run["dice_by_case"] = [[c.name, float(d)] for c, d in zip(test, np.nanmean(case_scores, axis=0))]
        if cfg.finetune_repeats > 1:
            run["dice_repeats"] = [d for d, _, _ in scores]
        if curve:
            run["curve"] = curve
        take(run, spent)
        spent = {}


# --------------------------------------------------------------------------- worker processes

_WORKER: dict = {}  # in a worker process: its _Work and message queue


def _worker_start(work: _Work, messages, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(work=work, messages=messages)


def _worker_unit(seed: int, method: str, todo: list) -> None:
    messages = _WORKER["messages"]
    _run_unit(_WORKER["work"], seed, method, todo, lambda run, spent: messages.put(("run", run, spent)),
              lambda text: messages.put(("say", text)))


def _run_in_workers(work: _Work, units: list, workers: int, take, say) -> None:
    """Run the units in ``workers`` processes (spawned: safe with CUDA), each with its share of
    the CPU threads; runs come back through a queue as each is scored, so ``take`` sees them as
    they finish. A worker's error is raised here once the others have stopped."""
    import multiprocessing
    import queue as queue_module
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    manager = pool = None
    try:
        # A Ctrl-C while a process starts is taken once it has: one that came while the parent was still writing a
        # spawned process's start-up data left that process to print a traceback of its own (EOFError).
        with _sigint_deferred():
            manager = context.Manager()
            messages = manager.Queue()
            threads = max(1, torch.get_num_threads() // workers)
            say(f"{len(units)} units of work in {workers} processes, {threads} CPU thread(s) each")
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                                       initargs=(work, messages, threads))
            futures = [pool.submit(_worker_unit, *unit) for unit in units]  # the workers start here
        pending = set(futures)
        while True:
            try:
                message = messages.get(timeout=0.2)
            except queue_module.Empty:
                if not pending:
                    break
                _, pending = wait(pending, timeout=0, return_when=FIRST_EXCEPTION)
                failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
                if failed:
                    raise failed[0].exception()
                continue
            if message[0] == "run":
                take(message[1], message[2])
            else:
                say(message[1])
        pool.shutdown()
    except BaseException:  # an error, or Ctrl-C: stop the other workers now, not after their units
        if pool is None:
            raise
        with _sigint_ignored():  # a second Ctrl-C must not cut this short (it left a traceback and workers)
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=10)
            pool.shutdown(wait=True)  # the pool's thread, joined now rather than at exit, where Ctrl-C could break in
        raise
    finally:
        if manager is not None:
            with _sigint_ignored():
                manager.shutdown()


@contextlib.contextmanager
def _sigint_deferred():
    """A Ctrl-C (SIGINT) inside is raised as KeyboardInterrupt when the block ends (in the main thread; elsewhere
    signals cannot be set and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored inside (in the main thread; elsewhere signals cannot be set and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _rows(runs: list[dict], methods, labeled) -> list[dict]:
    """One row per (method, labelled count) that has runs: mean and std over folds x seeds."""
    rows = []
    for method in methods:
        for m in labeled:
            sel = [r for r in runs if r["method"] == method and r["labeled"] == m]
            if not sel:
                continue
            d = np.array([r["dice"] for r in sel], dtype=float)  # None (from JSON) becomes NaN
            h = np.array([r["hd95"] for r in sel], dtype=float)
            # runs written before 2026-11-28 (evening) have no pooled Dice
            pooled = np.array([r.get("dice_pooled") for r in sel], dtype=float)
            rows.append({
                "method": method, "labeled": m, "dice": float(np.nanmean(d)),
                "dice_std": float(np.nanstd(d)), "hd95": float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
                "dice_pooled": float(np.nanmean(pooled)) if np.isfinite(pooled).any() else float("nan"),
                "n": len(sel), "n_pooled": int(np.isfinite(pooled).sum()),
            })
    return rows


def best_checkpoint_runs(runs: list[dict]) -> list[dict]:
    """The runs that have a ``curve`` (``--score-every``), each scored at its best checkpoint on the test fold:
    ``dice`` the highest per-volume Dice of its curve, ``dice_pooled`` the highest pooled Dice (each chosen
    on its own metric), ``best_step`` and ``best_step_pooled`` where they were, ``dice_end`` and
    ``dice_pooled_end`` the curve's last point (the run's own Dice, unless it averages --finetune-repeats,
    whose first fine-tuning alone is scored at checkpoints). This is how the published
    code reports a fold (the epoch that scored best on it); it picks the schedule on the test data, so it is
    optimistic, and shown only beside the runs' own Dice at the end of their schedule."""
    out = []
    for run in runs:
        curve = np.array(run.get("curve") or [], dtype=float).reshape(-1, 3)
        if not len(curve) or not np.isfinite(curve[:, 1]).any():
            continue
        best, best_pooled = int(np.nanargmax(curve[:, 1])), int(np.nanargmax(curve[:, 2]))
        out.append({**{k: v for k, v in run.items() if k != "curve"}, "dice": float(curve[best, 1]),
                    "hd95": float("nan"), "dice_pooled": float(curve[best_pooled, 2]),
                    "best_step": int(curve[best, 0]), "best_step_pooled": int(curve[best_pooled, 0]),
                    "dice_end": float(curve[-1, 1]), "dice_pooled_end": float(curve[-1, 2])})
    return out


def best_checkpoint_summary(runs: list[dict], methods, labeled, *, best: list[dict] | None = None) -> dict | None:
    """Rows (as the benchmark's) and paired differences with random init and CORAL of the runs at their
    best checkpoints (:func:`best_checkpoint_runs`, or ``best`` if the caller has them already); None when
    no run has a curve."""
    best = best_checkpoint_runs(runs) if best is None else best
    if not best:
        return None
    return {"rows": _rows(best, methods, labeled),
            "paired": paired_differences(best, "random") + paired_differences(best, "coral")}


def format_best_checkpoint(runs: list[dict], *, best: list[dict] | None = None) -> str:
    """Per method and labelled count: Dice and pooled Dice at the end of the schedule and at the best
    checkpoint (:func:`best_checkpoint_runs`, or ``best`` if the caller has them already), over the runs
    that have a curve, and the median best step."""
    best_runs = best_checkpoint_runs(runs) if best is None else best
    if not best_runs:
        return ""
    head = f"{'method':<8}{'M':>4}{'runs':>6}{'Dice end':>10}{'best':>8}{'pooled end':>12}{'best':>8}{'best step':>11}"
    lines = [head, "-" * len(head)]
    for method in dict.fromkeys(r["method"] for r in best_runs):
        for m in sorted({r["labeled"] for r in best_runs if r["method"] == method}):
            sel = [r for r in best_runs if r["method"] == method and r["labeled"] == m]
            lines.append(
                f"{method:<8}{m:>4}{len(sel):>6}{np.nanmean([r['dice_end'] for r in sel]):10.3f}"
                f"{np.nanmean([r['dice'] for r in sel]):8.3f}"
                f"{np.nanmean([r['dice_pooled_end'] for r in sel]):12.3f}"
                f"{np.nanmean([r['dice_pooled'] for r in sel]):8.3f}{np.median([r['best_step'] for r in sel]):11.0f}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Methods down, labelled counts across: ``Dice mean +- std (HD95 mm)``."""
    labeled = sorted({r["labeled"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["labeled"]): r for r in rows}
    head = f"{'method':<8}" + "".join(f"{f'M={m}: Dice (HD95 mm)':>26}" for m in labeled)
    lines = [head, "-" * len(head)]
    for method in methods:
        parts = []
        for m in labeled:
            r = cell.get((method, m))
            parts.append(f"{r['dice']:.3f} +- {r['dice_std']:.3f} ({r['hd95']:5.1f})" if r else "-")
        lines.append(f"{method:<8}" + "".join(f"{p:>26}" for p in parts))
    return "\n".join(lines)


def format_run_counts(rows: list[dict]) -> str:
    """A note when the rows hold different numbers of runs (a table continued with more seeds for some
    methods), naming the counts; "" when every row has as many."""
    if len({r["n"] for r in rows}) <= 1:
        return ""
    labeled = sorted({r["labeled"] for r in rows})
    groups: dict[str, list[str]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        counts = [next((r["n"] for r in rows if r["method"] == method and r["labeled"] == m), 0) for m in labeled]
        if len(set(counts)) == 1:
            text = f"{counts[0]} runs" if len(labeled) == 1 else f"{counts[0]} runs at each M"
        else:
            text = f"{'/'.join(map(str, counts))} runs at M = {'/'.join(map(str, labeled))}"
        groups.setdefault(text, []).append(method)
    described = "; ".join(f"{', '.join(methods)}: {text}" for text, methods in groups.items())
    return (f"note: the rows hold different numbers of runs ({described}), so their means cover different seeds "
            "or folds; the paired differences compare runs one for one")


def format_pooled(rows: list[dict]) -> str:
    """The pooled Dice of each row (methods down, labelled counts across); "" when no run has one."""
    if not any(np.isfinite(r.get("dice_pooled", float("nan"))) for r in rows):
        return ""
    labeled = sorted({r["labeled"] for r in rows})
    cell = {(r["method"], r["labeled"]): r.get("dice_pooled", float("nan")) for r in rows}
    lines = [f"{'method':<8}" + "".join(f"{f'M={m}':>9}" for m in labeled)]
    for method in dict.fromkeys(r["method"] for r in rows):
        lines.append(f"{method:<8}" + "".join(f"{cell.get((method, m), float('nan')):9.3f}" for m in labeled))
    return "\n".join(lines)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely a split of runs at least this uneven would be if
    each run were a coin toss between the two methods (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(max(wins, losses), n + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_differences(runs: list[dict], reference: str = "random") -> list[dict]:
    """Each method's Dice minus ``reference``'s on the same fold, seed and labelled volumes.

    The folds and the labelled draw are shared by all methods, so a paired difference removes
    the spread that comes from which subject happened to be labelled; ``wins`` counts the runs
    where the method scored higher, ``losses`` where it scored lower, and ``sign_p`` is the sign
    test's p-value for that split. That test takes the runs as independent; the runs of one seed
    share a pretraining, so it errs toward small p-values. Counted by pretraining instead, each
    seed's mean difference over its folds is one independent trial: ``seeds`` of them,
    ``seed_wins`` where the method led on average, ``seed_losses`` where it trailed, and
    ``seed_sign_p`` the sign test over those; ``seed_diff`` is the mean of the seeds' means (``diff`` when every
    seed holds as many folds) and ``seed_se`` its standard error over the seeds (None below two seeds), the
    uncertainty of the mean difference that the runs' own spread, ``diff_std``, does not give.
    """
    ref = {(r["labeled"], r["fold"], r["seed"]): r["dice"] for r in runs if r["method"] == reference}
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        for m in sorted({r["labeled"] for r in runs}):
            pairs = [(r["seed"], r["dice"] - ref[(m, r["fold"], r["seed"])]) for r in runs
                     if r["method"] == method and r["labeled"] == m and (m, r["fold"], r["seed"]) in ref]
            if method == reference or not pairs:
                continue
            d = np.array([x for _, x in pairs])
            by_seed = np.array([np.mean([x for s, x in pairs if s == seed]) for seed in sorted({s for s, _ in pairs})])
            wins, losses = int((d > 0).sum()), int((d < 0).sum())
            seed_wins, seed_losses = int((by_seed > 0).sum()), int((by_seed < 0).sum())
            rows.append({"method": method, "reference": reference, "labeled": m, "diff": float(d.mean()),
                         "diff_std": float(d.std()), "wins": wins, "losses": losses, "n": len(d),
                         "sign_p": sign_test_p(wins, losses), "seeds": len(by_seed), "seed_wins": seed_wins,
                         "seed_losses": seed_losses, "seed_sign_p": sign_test_p(seed_wins, seed_losses),
                         "seed_diff": float(by_seed.mean()),
                         "seed_se": float(by_seed.std(ddof=1) / np.sqrt(len(by_seed))) if len(by_seed) > 1 else None})
    return rows


def _paired_grid(rows: list[dict], heading: str, width: int, cell: Callable[[dict], str]) -> str:
    """One line per method, one column per labelled count (``heading`` names the column after ``M=m: ``),
    ``cell`` of the method's row at that count in each (``-`` where it has none)."""
    labeled = sorted({r["labeled"] for r in rows})
    of = {(r["method"], r["labeled"]): r for r in rows}
    head = f"{'vs ' + rows[0]['reference']:<12}" + "".join(f"{f'M={m}: {heading}':>{width}}" for m in labeled)
    lines = [head, "-" * len(head)]
    for method in dict.fromkeys(r["method"] for r in rows):
        parts = [cell(r) if r else "-" for r in (of.get((method, m)) for m in labeled)]
        lines.append(f"{method:<12}" + "".join(f"{p:>{width}}" for p in parts))
    return "\n".join(lines)


def format_paired(rows: list[dict]) -> str:
    """Paired Dice differences: ``mean +- std (wins/runs, sign test p)`` per method and labelled count."""
    if not rows:
        return ""

    def cell(r: dict) -> str:
        pval = r.get("sign_p")  # absent from tables written before the sign test
        return (f"{r['diff']:+.3f} +- {r['diff_std']:.3f} ({r['wins']}/{r['n']}"
                + (f", p {pval:.2g})" if pval is not None else ")"))

    return _paired_grid(rows, "Dice difference (wins, p)", 38, cell)


def format_paired_by_seed(rows: list[dict]) -> str:
    """The paired differences counted by pretraining: ``mean +- standard error, ahead/seeds (sign test p)`` per
    method and labelled count, over the seeds' mean differences, where a seed is ahead when its mean difference
    over its folds is positive. Empty when no seed holds more than one run (then it would repeat the count by
    run) or fewer than two seeds are held."""
    rows = [r for r in rows if "seeds" in r]
    if not rows or all(r["n"] == r["seeds"] for r in rows) or max(r["seeds"] for r in rows) < 2:
        return ""

    def cell(r: dict) -> str:
        count = f"{r['seed_wins']}/{r['seeds']} (p {r['seed_sign_p']:.2g})"
        if r.get("seed_se") is None:  # one seed, or a row written before the standard error was
            return count
        return f"{r['seed_diff']:+.3f} +- {r['seed_se']:.3f}, {count}"

    return _paired_grid(rows, "mean +- se, seeds ahead (p)", 38, cell)


@dataclass
class EmbeddingFigureConfig:
    """PCL against CORAL trajectories, the analogue of the CORAL paper's Figure 1."""

    methods: tuple[str, ...] = ("pcl", "coral")
    pretrain_subjects: int = 20
    shown_subjects: int = 5
    image_size: int = 64
    base_filters: int = 8
    pretrain_epochs: int = 8
    pretrain_batch: int = 32
    seed: int = 0
    device: str = "auto"


def run_embedding_figure(cfg: EmbeddingFigureConfig, out, progress: Callable[[str], None] | None = None) -> dict:
    """Pretrain each method on phantom subjects, embed unseen ones, draw both views in one figure.

    Returns each method's ordinal-consistency score over the shown subjects (pooled) and per subject.
    """
    from coral_core.embedding import project_trajectories
    from coral_core.infer import embed_volume
    from coral_core.phantom import make_cohort
    from coral_core.plotting import save_trajectory_panels_png

    say = progress or (lambda text: None)
    train = [img.array for img, _ in make_cohort(cfg.pretrain_subjects, seed=cfg.seed)]
    shown = make_cohort(cfg.shown_subjects, seed=cfg.seed + 5000)  # subjects no method has seen
    names = [f"s{i + 1}" for i in range(len(shown))]
    model_cfg = UNetConfig(base_filters=cfg.base_filters, image_size=cfg.image_size)
    panels, scores = [], {}
    for method in cfg.methods:
        say(f"pretrain {method}")
        pre_cfg = PretrainConfig(method=method, epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch,
                                 seed=cfg.seed, device=cfg.device, model=model_cfg)
        model = pretrain(pre_cfg, train).model
        device = model.canonical_direction.device
        features = [embed_volume(model, img.array, device) for img, _ in shown]
        direction = model.canonical_direction.cpu().numpy() if model.has_direction else None
        trajectories, _, score = project_trajectories(features, names, direction)
        panels.append((method.upper(), trajectories, score, direction is not None))
        scores[method] = {"pooled": score, "subjects": {t.name: t.score for t in trajectories}}
    save_trajectory_panels_png(
        out, panels, title=f"{len(shown)} unseen phantom subjects, one colour per slice position"
    )
    return scores
