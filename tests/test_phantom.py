"""The phantom cohort: deterministic, anatomically ordered, and varied between subjects."""

import numpy as np

from coral_core.phantom import make_cohort, make_phantom


def test_same_seed_same_subject_and_different_seeds_differ():
    a_img, a_lab = make_phantom(5)
    b_img, b_lab = make_phantom(5)
    np.testing.assert_array_equal(a_img.array, b_img.array)
    np.testing.assert_array_equal(a_lab.array, b_lab.array)
    c_img, _ = make_phantom(6)
    assert c_img.shape != a_img.shape or not np.array_equal(c_img.array, a_img.array)


def test_anatomy_runs_from_base_to_apex():
    for seed in range(6):
        img, lab = make_phantom(seed)
        n = lab.shape[0]
        assert 6 <= n <= 18 and img.array.dtype == np.float32 and lab.array.dtype == np.uint8
        assert set(np.unique(lab.array)) <= {0, 1, 2, 3}
        lv = (lab.array == 3).sum(axis=(1, 2))
        rv = (lab.array == 1).sum(axis=(1, 2))
        assert lv[0] > lv[n // 2] > lv[-1]  # the LV cavity shrinks toward the apex
        assert rv[0] > 0 and rv[-1] == 0  # the RV is there at the base and gone at the apex
        assert (lab.array[-1] == 2).any()  # the apex still has myocardium
        assert img.spacing == (10.0, 1.8, 1.8)


def test_subjects_vary_in_size_slices_and_intensity():
    cohort = make_cohort(8, seed=0)
    n_slices = {img.shape[0] for img, _ in cohort}
    lv_volume = [(lab.array == 3).sum() * np.prod(lab.spacing) for _, lab in cohort]
    gains = [np.percentile(img.array, 99) for img, _ in cohort]
    assert len(n_slices) >= 4
    assert max(lv_volume) > 1.5 * min(lv_volume)
    assert max(gains) > 1.5 * min(gains)


def test_blood_pool_is_not_separable_by_a_threshold():
    # Bright look-alikes (vessels, fat) share the cavity's intensities: thresholding at the
    # cavity's own median must catch many non-cavity pixels.
    img, lab = make_phantom(2)
    cavity = (lab.array == 3) | (lab.array == 1)
    threshold = np.median(img.array[cavity])
    bright = img.array > threshold
    assert (bright & ~cavity).sum() > (bright & cavity).sum()
