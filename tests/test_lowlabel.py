"""The low-label benchmark's protocol options reach the fine-tuning they describe."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

import coral_core.lowlabel as lowlabel
from coral_core.errors import UserError
from coral_core.lowlabel import LowLabelConfig, labelled_slices, load_labelled_cases, protocol_difference, run_lowlabel


def test_labelled_slices_are_spread_from_base_to_apex():
    assert labelled_slices(10, 3) == [1, 5, 8]
    assert labelled_slices(18, 3) == [3, 9, 15]
    assert labelled_slices(7, 1) == [3]  # the middle slice
    assert labelled_slices(3, 3) == [0, 1, 2] and labelled_slices(2, 3) == [0, 1]  # as many as there are
    assert labelled_slices(5, 0) == [0, 1, 2, 3, 4]  # 0: every slice
    for n in range(1, 20):
        for k in range(1, n):
            chosen = labelled_slices(n, k)
            assert len(set(chosen)) == k and chosen == sorted(chosen) and 0 <= chosen[0] and chosen[-1] < n


def test_fine_tuning_gets_the_chosen_slices_and_settings(monkeypatch):
    seen = []
    real = lowlabel.finetune

    def recording(cfg, init, images, labels, slices, *args, **kwargs):
        seen.append((cfg, [img.shape[0] for img in images], slices, kwargs.get("unlabelled")))
        return real(cfg, init, images, labels, slices, *args, **kwargs)

    pretrained = []
    real_pretrain = lowlabel.pretrain

    def recording_pretrain(cfg, *args, **kwargs):
        pretrained.append(cfg)
        return real_pretrain(cfg, *args, **kwargs)

    monkeypatch.setattr(lowlabel, "finetune", recording)
    monkeypatch.setattr(lowlabel, "pretrain", recording_pretrain)
    cases = load_labelled_cases(None, 4)
    cfg = LowLabelConfig.quick(methods=("random", "coral"), seeds=1, folds=2, workers=1, pretrain_epochs=1,
                               finetune_steps=1, base_filters=4, image_size=32, finetune_slices=3,
                               finetune_augment=False, finetune_scale=(0.7, 1.4), pretrain_scale=(0.6, 1.5),
                               finetune_cohort_weight=0.2, finetune_encoder_lr_scale=0.3, device="cpu")
    result = run_lowlabel(cfg, cases)
    assert len(result.runs) == 4 and len(seen) == 4
    assert [p.augment.scale for p in pretrained] == [(0.6, 1.5)] and pretrained[0].augment.enabled
    assert result.config["finetune_slices"] == 3 and result.config["finetune_augment"] is False
    assert result.config["finetune_scale"] == [0.7, 1.4] and result.config["pretrain_scale"] == [0.6, 1.5]
    assert result.config["finetune_cohort_weight"] == 0.2 and result.config["finetune_encoder_lr_scale"] == 0.3
    for ft_cfg, depths, slices, unlabelled in seen:
        assert ft_cfg.augment.enabled is False and ft_cfg.augment.scale == (0.7, 1.4)
        assert ft_cfg.encoder_lr_scale == 0.3
        assert ft_cfg.embedding_weight == 0.2 and len(unlabelled) == len(cases) - 1  # every other subject
        assert slices == [labelled_slices(n, 3) for n in depths] and all(len(s) == 3 for s in slices)
    seen.clear()
    defaults = {"finetune_slices": 0, "finetune_augment": True, "finetune_scale": (0.85, 1.15),
                "pretrain_scale": (0.85, 1.15), "finetune_cohort_weight": 0.0, "pretrain_extra": 0,
                "finetune_encoder_lr_scale": 1.0}
    again = run_lowlabel(LowLabelConfig.quick(**{**cfg.to_dict(), **defaults}), cases)
    for ft_cfg, depths, slices, unlabelled in seen:  # the defaults: every slice, augmented, no extra loss
        assert ft_cfg.augment.enabled is True and slices == [list(range(n)) for n in depths]
        assert ft_cfg.embedding_weight == 0.0 and unlabelled is None and ft_cfg.encoder_lr_scale == 1.0
    older = {k: v for k, v in again.config.items() if k not in defaults}  # a table from before these fields
    assert protocol_difference(older, again.config) is None
    assert "finetune_scale is [0.7, 1.4]" in protocol_difference({**again.config, "finetune_scale": [0.7, 1.4]}, again.config)


def test_extra_unlabelled_volumes_join_the_pretraining_only(monkeypatch):
    """`--pretrain-phantom N`: more subjects in every method's pretraining, none in the folds."""
    from coral_core.phantom import make_cohort

    pretrained, finetuned = [], []
    real_pretrain, real_finetune = lowlabel.pretrain, lowlabel.finetune

    def recording_pretrain(cfg, volumes, *args, **kwargs):
        pretrained.append([v.shape for v in volumes])
        return real_pretrain(cfg, volumes, *args, **kwargs)

    def recording_finetune(cfg, init, images, *args, **kwargs):
        finetuned.append([img.shape for img in images])
        return real_finetune(cfg, init, images, *args, **kwargs)

    monkeypatch.setattr(lowlabel, "pretrain", recording_pretrain)
    monkeypatch.setattr(lowlabel, "finetune", recording_finetune)
    cases = load_labelled_cases(None, 4)
    extra = [image.array for image, _ in make_cohort(3, seed=100_000)]
    cfg = LowLabelConfig.quick(methods=("random", "coral"), seeds=1, folds=2, workers=1, pretrain_epochs=1,
                               finetune_steps=1, base_filters=4, image_size=32, pretrain_extra=3, device="cpu")
    result = run_lowlabel(cfg, cases, pretrain_extra=extra)
    assert pretrained == [[c.image.shape for c in cases] + [v.shape for v in extra]]  # coral only; random does not pretrain
    names = {c.name for c in cases}
    assert len(finetuned) == 4 and all(set(r["train"]) | set(r["test"]) <= names for r in result.runs)
    assert result.config["pretrain_extra"] == 3
    with pytest.raises(ValueError, match="pretrain_extra is 3"):
        run_lowlabel(cfg, cases)


def test_prepared_volumes_reach_worker_processes_by_value():
    """Cine frames come prepared as tensors; sent to --workers processes they travel as NumPy arrays (not
    through shared memory, which containers limit) and arrive as the same tensors."""
    import pickle

    import torch

    from coral_core.lowlabel import _Work

    prepared, raw = torch.rand(3, 1, 8, 8), np.random.rand(2, 5, 5)
    work = _Work(LowLabelConfig.quick(), [], [], None, None, "cpu", [prepared, raw])
    back = pickle.loads(pickle.dumps(work))
    assert isinstance(back.pretrain_extra[0], torch.Tensor) and torch.equal(back.pretrain_extra[0], prepared)
    assert isinstance(back.pretrain_extra[1], np.ndarray) and np.array_equal(back.pretrain_extra[1], raw)
    assert work.pretrain_extra[0] is prepared  # the sender's list is left as it was


def test_pooled_dice_sums_every_test_slice_before_dividing(monkeypatch):
    """The published code's metric: each class's overlap and sizes summed over the fold's test slices, then
    divided; ours: per volume, then averaged. One volume half found and one small volume missed: 0.25
    per volume, 8/18 pooled. A class in no volume counts in neither."""
    from coral_core.levers import Levers

    truth_a, pred_a = np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8)
    truth_a[0, :2, :] = 1  # 8 voxels
    pred_a[0, 1:3, :] = 1  # 8 voxels, 4 of them right
    truth_b = np.zeros((2, 4, 4), np.uint8)
    truth_b[1, 0, :2] = 1  # 2 voxels, none found
    cases = [lowlabel.LabelledCase("a", truth_a.astype(np.float32), truth_a, (1.0, 1.0, 1.0)),
             lowlabel.LabelledCase("b", truth_b.astype(np.float32), truth_b, (1.0, 1.0, 1.0))]
    preds = {"a": pred_a, "b": np.zeros_like(truth_b)}
    monkeypatch.setattr(lowlabel, "segment_volume",
                        lambda model, image, *a, **k: preds["a" if image.sum() == 8 else "b"])
    dice, _, pooled, by_case = lowlabel._score(None, cases, 3, "cpu", Levers())
    assert dice == 0.25 and abs(pooled - 8 / 18) < 1e-12
    assert by_case == [0.5, 0.0]  # each volume's own: a found half of its class, b none


def test_finetune_repeats_average_fine_tunings_with_their_own_seeds():
    """`--finetune-repeats R`: each run fine-tuned R times from the same pretraining, with its own seed then
    seed + k * FINETUNE_REPEAT_SEED_STEP, and the Dice averaged; the first repeat is the plain run."""
    cases = load_labelled_cases(None, 4)
    base = dict(methods=("random", "coral"), seeds=1, folds=2, workers=1, pretrain_epochs=1, finetune_steps=30,
                base_filters=4, image_size=32, device="cpu")
    plain = run_lowlabel(LowLabelConfig.quick(**base), cases)
    repeated = run_lowlabel(LowLabelConfig.quick(**base, finetune_repeats=3), cases)
    assert repeated.config["finetune_repeats"] == 3
    assert "finetune_repeats is 1, this run's 3" in protocol_difference(plain.config, repeated.config)
    assert "dice_repeats" not in plain.runs[0]
    for one, three in zip(plain.runs, repeated.runs):
        assert len(three["dice_repeats"]) == 3 and three["dice_repeats"][0] == one["dice"]
        assert np.isclose(three["dice"], np.mean(three["dice_repeats"]))
        assert len(set(three["dice_repeats"])) > 1  # other seeds, other fine-tunings
        # each test volume's Dice, averaged over the fine-tunings: the run's Dice is their mean
        for run in (one, three):
            assert [name for name, _ in run["dice_by_case"]] == run["test"]
            assert np.isclose(np.mean([d for _, d in run["dice_by_case"]]), run["dice"])
        assert [d for _, d in three["dice_by_case"]] != [d for _, d in one["dice_by_case"]]


def test_scoring_checkpoints_leaves_each_run_as_it_was(monkeypatch):
    """`--score-every K`: each run's first fine-tuning is scored on its test fold every K steps and at the end
    (its "curve"), which leaves the run's own Dice as they were, bit for bit; it is not part of the protocol.
    `--finetune-shift` and `--freeze-encoder-steps` reach the fine-tuning and are."""
    seen, frozen = [], []
    real = lowlabel.finetune

    def recording(cfg, *args, **kwargs):
        seen.append(cfg.augment.translate)
        frozen.append(cfg.encoder_frozen_steps)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(lowlabel, "finetune", recording)
    cases = load_labelled_cases(None, 4)
    base = dict(methods=("random", "coral"), seeds=1, folds=2, workers=1, pretrain_epochs=1, finetune_steps=25,
                base_filters=4, image_size=32, device="cpu")
    plain = run_lowlabel(LowLabelConfig.quick(**base), cases)
    scored = run_lowlabel(LowLabelConfig.quick(**base, score_every=10), cases)
    assert seen == [0.08] * 8
    assert protocol_difference(plain.config, scored.config) is None
    for one, other in zip(plain.runs, scored.runs):
        assert "curve" not in one and {k: v for k, v in other.items() if k != "curve"} == one
        assert [step for step, _, _ in other["curve"]] == [10, 20, 25]
        assert other["curve"][-1][1:] == [one["dice"], one["dice_pooled"]]  # the end is the run's own score
    shifted = run_lowlabel(LowLabelConfig.quick(**base, finetune_shift=0.25), cases)
    assert seen[8:] == [0.25] * 4 and shifted.config["finetune_shift"] == 0.25
    assert "finetune_shift is 0.08, this run's 0.25" in protocol_difference(plain.config, shifted.config)
    older = {k: v for k, v in plain.config.items() if k not in ("finetune_shift", "finetune_encoder_frozen_steps")}
    assert protocol_difference(older, plain.config) is None  # a table from before these options
    probed = run_lowlabel(LowLabelConfig.quick(**base, finetune_encoder_frozen_steps=10), cases)
    assert frozen == [0] * 12 + [10] * 4 and probed.config["finetune_encoder_frozen_steps"] == 10
    assert "finetune_encoder_frozen_steps is 0, this run's 10" in protocol_difference(plain.config, probed.config)


def test_another_fold_seed_splits_the_subjects_otherwise_and_is_another_protocol():
    """Every run shares one split into folds; --fold-seed draws another, in which every subject is still tested
    once per seed, and a table of one split is not continued with another."""
    cases = load_labelled_cases(None, 6)
    base = dict(methods=("random",), seeds=1, folds=3, workers=1, finetune_steps=1, base_filters=4, image_size=32,
                device="cpu")
    default = run_lowlabel(LowLabelConfig.quick(**base), cases)
    other = run_lowlabel(LowLabelConfig.quick(**base, fold_seed=1), cases)
    splits = []
    for result in (default, other):
        tested = [s for r in result.runs for s in r["test"]]
        assert sorted(tested) == sorted(c.name for c in cases)  # each subject tested once
        assert all(not set(r["train"]) & set(r["test"]) for r in result.runs)
        splits.append({frozenset(r["test"]) for r in result.runs})
    assert splits[0] == {frozenset(f) for f in lowlabel.make_folds([c.name for c in cases], 3)}
    assert splits[1] == {frozenset(f) for f in lowlabel.make_folds([c.name for c in cases], 3, 1)} != splits[0]
    assert default.config["fold_seed"] == 0 and other.config["fold_seed"] == 1
    assert "fold_seed is 0, this run's 1" in protocol_difference(default.config, other.config)
    older = {k: v for k, v in default.config.items() if k != "fold_seed"}  # a table from before the option
    assert protocol_difference(older, default.config) is None
    with pytest.raises(UserError, match="--fold-seed"):
        LowLabelConfig.quick(fold_seed=-1)


def test_the_best_checkpoint_is_chosen_on_each_metric_and_shown_beside_the_end():
    """What keeping each run's best epoch on the test fold (the published code's choice) reports: the highest
    per-volume Dice and, chosen on its own, the highest pooled Dice of the curve; runs without one are left out."""
    from coral_core.lowlabel import best_checkpoint_runs, best_checkpoint_summary, format_best_checkpoint

    def run(method, fold, curve):
        r = {"method": method, "labeled": 1, "fold": fold, "seed": 0, "dice": curve[-1][1], "hd95": 5.0,
             "dice_pooled": curve[-1][2], "train": ["a"], "test": ["b"]}
        return {**r, "curve": curve} if curve else r

    runs = [run("random", 0, [[10, 0.5, 0.7], [20, 0.8, 0.6], [30, 0.7, 0.65]]),
            run("random", 1, [[10, 0.6, 0.6], [20, 0.65, 0.66], [30, 0.7, 0.7]]),
            run("coral", 0, [[10, 0.9, 0.5], [20, 0.7, 0.9], [30, 0.75, 0.8]]),
            run("coral", 1, [[10, 0.7, 0.7], [20, 0.72, 0.72], [30, 0.71, 0.71]])]
    best = best_checkpoint_runs(runs)
    assert [(r["dice"], r["best_step"], r["dice_pooled"], r["best_step_pooled"]) for r in best] == [
        (0.8, 20, 0.7, 10), (0.7, 30, 0.7, 30), (0.9, 10, 0.9, 20), (0.72, 20, 0.72, 20)]
    assert all("curve" not in r and np.isnan(r["hd95"]) for r in best)
    summary = best_checkpoint_summary(runs, ("random", "coral"), (1,))
    (paired,) = [p for p in summary["paired"] if p["reference"] == "random"]
    assert np.isclose(paired["diff"], ((0.9 - 0.8) + (0.72 - 0.7)) / 2) and paired["wins"] == 2
    assert [r["dice"] for r in summary["rows"]] == [np.mean([0.8, 0.7]), np.mean([0.9, 0.72])]
    text = format_best_checkpoint(runs).splitlines()
    assert text[2].split() == ["random", "1", "2", "0.700", "0.750", "0.675", "0.700", "25"]
    # the CLI computes the best checkpoints once and hands them to both: what is handed in is what they use
    same = json.dumps(best_checkpoint_summary(runs, ("random", "coral"), (1,), best=best), sort_keys=True)
    assert same == json.dumps(summary, sort_keys=True)  # JSON: the rows' HD95 are NaN, never equal to themselves
    assert format_best_checkpoint(runs, best=best).splitlines() == text
    only_random = best[:2]
    assert [r["method"] for r in best_checkpoint_summary(runs, ("random", "coral"), (1,), best=only_random)["rows"]] \
        == ["random"]
    assert format_best_checkpoint(runs, best=only_random).splitlines() == text[:3]
    without = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
    assert best_checkpoint_runs(without) == [] and best_checkpoint_summary(without, ("random",), (1,)) is None
    assert format_best_checkpoint(without) == ""


def test_pixel_spacing_brings_every_case_to_one_scale_before_anything_sees_it(monkeypatch):
    """`--pixel-spacing MM`: pretraining, fine-tuning and scoring all get the cases resampled to MM per
    pixel at image_size x image_size, and HD95 is measured at that spacing, as the published code scores;
    a crop that would cut labelled anatomy is refused, naming the case."""
    import pytest

    from coral_core.data import at_pixel_spacing
    from coral_core.errors import UserError

    cases = load_labelled_cases(None, 4)  # 128 x 128 at 1.8 mm
    cases[1].spacing = (10.0, 1.5, 1.5)  # as if scanned finer: the same pixels cover less
    pretrained, finetuned, scored = [], [], []
    real_pretrain, real_finetune, real_score = lowlabel.pretrain, lowlabel.finetune, lowlabel._score

    def recording_pretrain(cfg, volumes, *args, **kwargs):
        pretrained.append([np.asarray(v) for v in volumes])
        return real_pretrain(cfg, volumes, *args, **kwargs)

    def recording_finetune(cfg, init, images, labels, *args, **kwargs):
        finetuned.append((images, labels))
        return real_finetune(cfg, init, images, labels, *args, **kwargs)

    def recording_score(model, test, *args, **kwargs):
        scored.append(test)
        return real_score(model, test, *args, **kwargs)

    monkeypatch.setattr(lowlabel, "pretrain", recording_pretrain)
    monkeypatch.setattr(lowlabel, "finetune", recording_finetune)
    monkeypatch.setattr(lowlabel, "_score", recording_score)
    cfg = LowLabelConfig.quick(methods=("coral",), seeds=1, folds=2, workers=1, pretrain_epochs=1, finetune_steps=1,
                               base_filters=4, image_size=64, pixel_spacing=3.2, device="cpu")
    result = run_lowlabel(cfg, cases)
    assert result.config["pixel_spacing"] == 3.2 and len(result.runs) == 2
    expected = {c.name: at_pixel_spacing(c.image, c.spacing, 3.2, 64, c.labels) for c in cases}
    for case, volume in zip(cases, pretrained[0]):
        assert np.array_equal(volume, expected[case.name][0])
    for images, labels in finetuned:
        assert all(img.shape[1:] == (64, 64) for img in images)
        assert any(np.array_equal(lab, e[1]) for lab in labels for e in expected.values())
    for test in scored:
        for case in test:
            image, labels, spacing, _ = expected[case.name]
            assert np.array_equal(case.image, image) and np.array_equal(case.labels, labels) and case.spacing == spacing
    for case in cases:  # the anatomy keeps its area in mm^2: a 1.5 mm scan's heart shrinks more in pixels
        before = np.count_nonzero(case.labels) * case.spacing[1] * case.spacing[2]
        assert np.count_nonzero(expected[case.name][1]) * 3.2 ** 2 == pytest.approx(before, rel=0.03)
    older = {k: v for k, v in result.config.items() if k != "pixel_spacing"}  # a table from before the option
    assert protocol_difference(older, {**result.config, "pixel_spacing": None}) is None
    assert "pixel_spacing is None" in protocol_difference(older, result.config)
    with pytest.raises(UserError, match=r"phantom\d: at 1\.8 mm per pixel a 32 x 32 crop \(57\.6 mm\) cuts away \d+ "
                                        r"labelled voxels; raise --image-size or --pixel-spacing"):
        run_lowlabel(LowLabelConfig.quick(**{**cfg.to_dict(), "pixel_spacing": 1.8, "image_size": 32}), cases)
    with pytest.raises(UserError, match="--pixel-spacing must be"):
        LowLabelConfig.quick(pixel_spacing=-1.0)


def test_rows_with_different_run_counts_are_named_in_a_note():
    from coral_core.lowlabel import _rows, format_run_counts

    def runs(method, seeds, labeled=(1, 6)):
        return [{"method": method, "labeled": m, "fold": k, "seed": s, "dice": 0.8, "hd95": 5.0}
                for s in range(seeds) for m in labeled for k in range(5)]

    # a table continued with 8 seeds for the baselines, 16 for random init and CORAL
    every = runs("random", 16) + runs("coral", 16) + runs("pcl", 8) + runs("gcl", 8)
    note = format_run_counts(_rows(every, ["random", "coral", "pcl", "gcl"], [1, 6]))
    assert note == ("note: the rows hold different numbers of runs (random, coral: 80 runs at each M; pcl, gcl: 40 "
                    "runs at each M), so their means cover different seeds or folds; the paired differences compare "
                    "runs one for one")
    # a method with more runs at one labelled count than at another
    uneven = runs("random", 2) + runs("coral", 2, labeled=(1,)) + runs("coral", 1, labeled=(6,))
    assert "random: 10 runs at each M; coral: 10/5 runs at M = 1/6" in format_run_counts(
        _rows(uneven, ["random", "coral"], [1, 6]))
    assert format_run_counts(_rows(runs("random", 3) + runs("coral", 3), ["random", "coral"], [1, 6])) == ""
    assert "(random: 5 runs; coral: 10 runs)" in format_run_counts(
        _rows(runs("random", 1, (1,)) + runs("coral", 2, (1,)), ["random", "coral"], [1]))


def test_paired_differences_are_also_counted_by_pretraining():
    """A seed's runs share one pretraining: counted by seed, a method is ahead where its mean difference over
    the seed's folds is positive, however many of those folds it won."""
    from coral_core.lowlabel import format_paired_by_seed, paired_differences, sign_test_p

    # seed 0: coral wins 4 folds by 0.01 and loses one by 0.1 (behind on average); seeds 1-3: ahead in every fold
    gaps = {0: [0.01, 0.01, 0.01, 0.01, -0.1], 1: [0.02] * 5, 2: [0.01] * 5, 3: [0.03] * 5}
    runs = []
    for seed, diffs in gaps.items():
        for fold, d in enumerate(diffs):
            base = {"labeled": 1, "fold": fold, "seed": seed, "hd95": 5.0}
            runs += [{**base, "method": "random", "dice": 0.7}, {**base, "method": "coral", "dice": 0.7 + d}]
    (row,) = paired_differences(runs, "random")
    assert (row["wins"], row["losses"], row["n"]) == (19, 1, 20) and row["sign_p"] == sign_test_p(19, 1)
    assert (row["seed_wins"], row["seed_losses"], row["seeds"]) == (3, 1, 4) and row["seed_sign_p"] == 0.625
    # the seeds' means are -0.012, 0.02, 0.01 and 0.03: their mean, and its standard error over the 4 seeds
    means = np.array([-0.012, 0.02, 0.01, 0.03])
    assert np.isclose(row["seed_diff"], means.mean()) and np.isclose(row["seed_diff"], row["diff"])
    assert np.isclose(row["seed_se"], np.sqrt(np.sum((means - means.mean()) ** 2) / 3 / 4))
    text = format_paired_by_seed([row]).splitlines()
    assert text[0].split() == ["vs", "random", "M=1:", "mean", "+-", "se,", "seeds", "ahead", "(p)"]
    assert text[2].split() == ["coral", "+0.012", "+-", "0.009,", "3/4", "(p", "0.62)"]
    # one run per seed (a single fold): the count by seed is the count by run, so nothing more is printed
    single = [r for r in runs if r["fold"] == 0]
    assert format_paired_by_seed(paired_differences(single, "random")) == ""
    # a single seed: nothing to count either
    assert format_paired_by_seed(paired_differences([r for r in runs if r["seed"] == 1], "random")) == ""
    # a row written before the standard error existed still gives its count
    assert format_paired_by_seed([{k: v for k, v in row.items() if k != "seed_se"}]).splitlines()[2].split() == [
        "coral", "3/4", "(p", "0.62)"]
    # rows written before the count by seed existed (a continued table's "paired") are left out, not failed on
    assert format_paired_by_seed([{k: v for k, v in row.items() if not k.startswith("seed")}]) == ""


def test_a_case_without_a_structure_is_left_out_of_the_benchmark(tmp_path):
    """`coral bench lowlabel --data DIR --structures ...`: a case whose labels lack one of the structures is left out
    with one warning (the others are the cohort); none left: one sentence."""
    from coral_core.phantom import make_phantom
    from coral_core.volume import save_volume

    for k in range(3):
        img, lab = make_phantom(50 + k, n_slices=4)
        save_volume(tmp_path / f"ct_{k}_image.nii.gz", img.array, np.eye(4))
        save_volume(tmp_path / f"ct_{k}_label.nii.gz", lab.array, np.eye(4),
                    ["background", "RV", "myocardium", "LV" if k else "Aorta"])
    with pytest.warns(UserWarning, match=r"ct_0_label.nii.gz: holds no structure named 'LV'; it holds RV, myocardium, "
                                         r"Aorta .*; the case is left out"):
        cases = load_labelled_cases(str(tmp_path), 0, structures=["LV", "RV"])
    assert [c.name for c in cases] == ["ct_1", "ct_2"]
    img, lab = make_phantom(51, n_slices=4)
    np.testing.assert_array_equal(cases[0].labels, np.select([lab.array == 3, lab.array == 1], [1, 2], 0))
    with pytest.raises(UserError, match="holds no structure named 'Lung'.*, nor does any other case"):
        load_labelled_cases(str(tmp_path), 0, structures=["Lung"])


def test_a_ctrl_c_while_the_workers_start_is_taken_once_they_have():
    """`--workers`: the pool and its processes start inside `_sigint_deferred`; a Ctrl-C there lets the start-up
    finish (a spawned worker cut off mid start-up printed a traceback), then stops the benchmark as before."""
    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with lowlabel._sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
            finished.append("started")
    assert finished == ["started"]
    assert signal.getsignal(signal.SIGINT) is before
    with lowlabel._sigint_deferred():  # no Ctrl-C: nothing raised
        finished.append("again")
    assert finished == ["started", "again"] and signal.getsignal(signal.SIGINT) is before
