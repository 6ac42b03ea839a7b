"""Dice, HD95 (spacing-aware), largest pieces, trajectory projection, ordinal consistency, suggestions."""

import numpy as np
import pytest

from coral_core.embedding import ordinal_consistency, project_trajectories, suggest_slices
from coral_core.metrics import dice_per_class, evaluate_segmentation, hd95_per_class, summarise_cases


def test_dice_by_hand():
    truth = np.zeros((1, 4, 4), int)
    pred = np.zeros((1, 4, 4), int)
    truth[0, :2, :2] = 1  # 4 voxels
    pred[0, :2, :1] = 1  # 2 voxels, both inside
    d = dice_per_class(pred, truth, 3)
    assert d[1] == pytest.approx(2 * 2 / 6) and np.isnan(d[2])


def test_hd95_uses_spacing():
    truth = np.zeros((10, 10, 10), bool)
    pred = np.zeros((10, 10, 10), bool)
    truth[2:5, 3:7, 3:7] = True
    pred[4:7, 3:7, 3:7] = True  # shifted by 2 voxels along z
    hd = hd95_per_class(pred.astype(int), truth.astype(int), 2, spacing=(3.0, 1.0, 1.0))
    assert hd[1] == pytest.approx(6.0)
    assert hd95_per_class(pred.astype(int), np.zeros_like(truth, int), 2)[1] == float("inf")
    result = evaluate_segmentation(pred.astype(int), truth.astype(int), 2, (3.0, 1.0, 1.0), ["bg", "fg"])
    assert result["mean_dice"] == pytest.approx(1 / 3) and result["hd95"]["fg"] == pytest.approx(6.0)


def _direct_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """HD95 as plainly defined: the surface voxels of each mask (in it, with a face neighbour outside it or beyond the
    array), every one's distance in mm to the nearest surface voxel of the other, both ways, their 95th percentile."""
    def surface(mask):
        points = []
        for z, y, x in zip(*np.nonzero(mask)):
            for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                n = (z + dz, y + dy, x + dx)
                if not all(0 <= i < size for i, size in zip(n, mask.shape)) or not mask[n]:
                    points.append((z, y, x))
                    break
        return np.array(points, float) * np.asarray(spacing)

    a, b = surface(pred), surface(truth)
    between = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # every pair of surface voxels
    return float(np.percentile(np.concatenate([between.min(1), between.min(0)]), 95))


def test_hd95_equals_its_direct_definition_on_random_shapes():
    rng = np.random.default_rng(7)
    for trial in range(6):
        shape = (5 + trial % 3, 9, 11)
        spacing = (rng.uniform(1, 8), rng.uniform(0.5, 2), rng.uniform(0.5, 2))
        truth = rng.integers(0, 3, shape) * (rng.random(shape) < 0.6)
        pred = np.where(rng.random(shape) < 0.3, rng.integers(0, 3, shape), truth)
        got = hd95_per_class(pred, truth, 3, spacing=spacing)
        for c in (1, 2):
            assert got[c] == pytest.approx(_direct_hd95(pred == c, truth == c, spacing), rel=1e-9), (trial, c)


def test_summaries_count_infinite_distances_down_to_the_frames():
    """A class in only one of the two files has no finite HD95: the summary's means leave it out and hd95_missed
    counts it, a case that is itself a summary (a cine series' frames) bringing its own count."""
    truth = np.zeros((4, 8, 8), np.int64)
    truth[1:3, 2:6, 2:6] = 1
    found, missed = evaluate_segmentation(truth, truth, 2), evaluate_segmentation(np.zeros_like(truth), truth, 2)
    assert missed["hd95"]["1"] == np.inf and found["hd95"]["1"] == 0.0
    cine = summarise_cases([found, missed, missed])
    assert cine["hd95_missed"] == {"1": 2} and cine["hd95"]["1"] == 0.0 and cine["dice"]["1"] == pytest.approx(1 / 3)
    folder = summarise_cases([cine, missed, found])
    assert folder["hd95_missed"] == {"1": 3}
    assert folder["mean_dice"] == pytest.approx(np.mean([1 / 3, 0.0, 1.0]))


def test_keeping_the_largest_piece_of_each_class():
    from coral_core.infer import keep_largest_components

    labels = np.zeros((4, 10, 10), np.uint8)
    labels[0:2, 2:6, 2:6] = 1  # class 1's main piece: 32 voxels
    labels[2, 6, 6] = 1  # touches it only at a corner (slice 1, voxel 5, 5): the same piece
    labels[3, 0, 9] = 1  # an island of one voxel
    labels[0:4, 8:10, 0:2] = 2  # class 2 in one piece
    labels[1, 8, 8] = 3  # class 3: two single voxels, the first found kept
    labels[3, 8, 8] = 3
    kept, removed = keep_largest_components(labels)
    expected = labels.copy()
    expected[3, 0, 9] = 0
    expected[3, 8, 8] = 0
    np.testing.assert_array_equal(kept, expected)
    assert removed == 2 and kept.dtype == labels.dtype and labels[3, 0, 9] == 1  # the input is left as it was
    series, removed = keep_largest_components(np.stack([labels, np.zeros_like(labels), labels]))  # frame by frame
    np.testing.assert_array_equal(series, np.stack([expected, np.zeros_like(labels), expected]))
    assert removed == 4
    faces, removed = keep_largest_components(labels, connectivity=1)  # joined through faces alone
    assert removed == 3 and faces[2, 6, 6] == 0 and faces[1, 5, 5] == 1  # the corner-touching voxel is a piece


def test_ordered_trajectories_score_one_and_follow_the_direction():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    feats = []
    for n in (8, 12):
        t = np.linspace(0, 1, n)[:, None]
        feats.append(t * direction[None] * 3 + rng.normal(scale=0.01, size=(n, 16)))
    traj, basis, score = project_trajectories(feats, ["a", "b"], direction)
    assert score > 0.99 and all(t.score == pytest.approx(1.0) for t in traj)  # pooled: tied positions
    np.testing.assert_allclose(basis[0], direction / np.linalg.norm(direction))
    assert traj[0].xy.shape == (8, 2) and traj[1].positions[-1] == 1.0
    # Reversed order scores -1 against the same direction.
    _, _, rev = project_trajectories([f[::-1] for f in feats], direction=direction)
    assert rev < -0.99
    # Without a direction the first principal component is oriented base -> apex.
    _, _, pca_score = project_trajectories(feats)
    assert pca_score > 0.99


def test_identical_slices_get_no_score_rather_than_their_rounding_noise():
    """A blank scan's slices give the same features up to float32 rounding (about 1e-7 of their size):
    neither its own score nor the pooled one may come from that noise, while a real volume beside it keeps its
    score."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=16) * 3
    blank = base[None] + rng.normal(scale=3e-7, size=(6, 16))
    ordered = np.linspace(0, 1, 8)[:, None] * rng.normal(size=16)[None] + base[None]
    traj, _, score = project_trajectories([blank], ["blank"])
    assert np.isnan(score) and np.isnan(traj[0].score)
    traj, _, score = project_trajectories([blank, ordered], ["blank", "ordered"])
    assert np.isnan(traj[0].score) and traj[1].score == pytest.approx(1.0) and score > 0.5
    assert np.isnan(ordinal_consistency(np.array([1.0, 1.0 + 1e-9]), np.array([0.5, 1.0]), tol=1e-6))


def test_non_finite_features_are_one_sentence_naming_the_volume():
    """A model whose weights went NaN gives NaN features; the principal axes' SVD then raised "SVD did not
    converge" (LinAlgError) in the Embedding panel and `coral embed`."""
    from coral_core.errors import UserError

    broken = np.ones((5, 8))
    broken[[1, 3], 2] = np.nan
    broken[4, 0] = np.inf
    with pytest.raises(UserError, match=r"^b: the model gives NaN or infinite features for 3 of its 5 slices .*; "
                                        r"use another model$"):
        project_trajectories([np.random.default_rng(0).random((4, 8)), broken], ["a", "b"])


def test_shuffled_slices_score_near_zero():
    rng = np.random.default_rng(1)
    assert abs(ordinal_consistency(rng.normal(size=200), np.linspace(0, 1, 200))) < 0.2


def test_suggestions_are_far_from_annotated_slices():
    feats = np.array([[0.0], [0.1], [0.2], [5.0], [9.0], [9.1]])
    assert suggest_slices(feats, annotated=[0], k=2) == [5, 3]
    assert len(suggest_slices(feats, annotated=[], k=3)) == 3
    # restricted to candidates (the slices holding the structures): the farthest of those, never another
    assert suggest_slices(feats, annotated=[0], k=2, candidates=[1, 2, 3]) == [3, 2]
    assert suggest_slices(feats, annotated=[], k=2, candidates=[3, 4, 5]) == [4, 3]  # the start is a candidate too
    assert suggest_slices(feats, annotated=[0], k=3, candidates=[]) == []
