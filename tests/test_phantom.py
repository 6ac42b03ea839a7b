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


def test_a_field_of_view_range_cuts_or_pads_the_same_subject():
    """PhantomConfig.field_of_view acquires each subject with another field of view at the same spacing: the
    same anatomy and draws, the centre cut out or surrounded by background noise; (1, 1) changes nothing."""
    from coral_core.phantom import PhantomConfig

    image, labels = make_phantom(5)
    same, _ = make_phantom(5, config=PhantomConfig(field_of_view=(1.0, 1.0)))
    np.testing.assert_array_equal(same.array, image.array)
    wide, wide_labels = make_phantom(5, config=PhantomConfig(field_of_view=(1.5, 1.5)))
    assert wide.shape == (image.shape[0], 192, 192) and wide.spacing == image.spacing
    np.testing.assert_array_equal(wide.array[:, 32:160, 32:160], image.array)
    np.testing.assert_array_equal(wide_labels.array[:, 32:160, 32:160], labels.array)
    border = wide.array[:, :32]
    assert not wide_labels.array[:, :32].any() and (border > 0).all()
    # noise of the body's surroundings: its level, not a constant
    corner = image.array[:, :6, :6]
    assert 0.5 < border.mean() / corner.mean() < 2 and border.std() > 0
    narrow, narrow_labels = make_phantom(5, config=PhantomConfig(field_of_view=(0.75, 0.75)))
    np.testing.assert_array_equal(narrow.array, image.array[:, 16:112, 16:112])
    assert narrow_labels.array.sum() == labels.array.sum()  # the heart lies inside the cut
    sizes = {make_phantom(s, config=PhantomConfig(field_of_view=(0.8, 1.6)))[0].shape[1] for s in range(8)}
    assert len(sizes) > 4 and min(sizes) >= 102 and max(sizes) <= 205


def test_slices_beyond_the_heart_hold_the_torso_without_labels():
    """PhantomConfig.beyond_heart adds slices above the base and below the apex, as a scan that reaches past the
    heart: the heart's slices keep their labels, the added ones hold the body (and the liver below) but no label;
    0 changes nothing."""
    from coral_core.phantom import PhantomConfig

    image, labels = make_phantom(5)
    same, _ = make_phantom(5, config=PhantomConfig(beyond_heart=0))
    np.testing.assert_array_equal(same.array, image.array)
    wide, wide_labels = make_phantom(5, config=PhantomConfig(beyond_heart=3))
    n = image.shape[0]
    assert wide.shape == (n + 6, *image.shape[1:]) and wide.spacing == image.spacing
    np.testing.assert_array_equal(wide_labels.array[3:3 + n], labels.array)
    assert not wide_labels.array[:3].any() and not wide_labels.array[3 + n:].any()
    contrast = [wide.array[k].mean() / wide.array[k][:6, :6].mean() for k in range(n + 6)]  # body against noise
    heart = np.mean(contrast[3:3 + n])
    assert heart > 2 and all(0.6 * heart < c < 1.6 * heart for c in contrast[:3] + contrast[3 + n:]), contrast
    centre = (slice(None), slice(32, 96), slice(32, 96))
    assert 0.5 < wide.array[:3][centre].mean() / wide.array[3:3 + n][centre].mean() < 2
