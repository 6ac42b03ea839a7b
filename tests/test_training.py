"""Pretraining and fine-tuning loops: every method trains, seeds repeat, stop works,
unannotated slices never enter the loss, and inference keeps the input's shape."""

import threading

import numpy as np
import pytest
import torch

from coral_core.augment import AugmentConfig, augment_batch
from coral_core.errors import UserError
from coral_core.finetune import FinetuneConfig, annotated_from_labels, finetune
from coral_core.infer import embed_volume, iter_segment_volume, segment_volume
from coral_core.model import UNetConfig, build_model
from coral_core.phantom import make_cohort
from coral_core.pretrain import METHODS, PretrainConfig, pretrain

TINY = UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=16)


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(3, seed=7)


def _pre_cfg(method, **kw):
    return PretrainConfig(method=method, epochs=1, batch_size=8, device="cpu", model=TINY, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(cohort, method):
    seen = []
    result = pretrain(_pre_cfg(method), [img.array for img, _ in cohort], lambda s, t, m: seen.append((s, t, m)))
    assert seen and seen[-1][0] == seen[-1][1] == len(result.history.steps)
    assert all(np.isfinite(m["loss"]) for _, _, m in seen)
    if method in ("coral", "ral", "oal"):
        assert {"ral", "oal"} <= set(seen[0][2])
    assert result.model.has_direction == (method in ("coral", "oal"))


def test_pretraining_repeats_with_a_seed_and_changes_the_encoder(cohort):
    vols = [img.array for img, _ in cohort]
    a = pretrain(_pre_cfg("coral", seed=3), vols)
    b = pretrain(_pre_cfg("coral", seed=3), vols)
    assert a.history.metrics["loss"] == b.history.metrics["loss"]
    torch.manual_seed(3)  # pretrain seeds the global generator with config.seed, then builds its model
    initial = build_model(TINY)
    trained = a.model.state_dict()
    enc = [k for k in trained if k.startswith("encoder.") and k.endswith("weight")]
    dec = [k for k in trained if k.startswith("decoder.")]
    assert all(not torch.equal(trained[k], initial.state_dict()[k]) for k in enc)  # pretraining moved the encoder
    assert all(torch.equal(trained[k], initial.state_dict()[k]) for k in dec)  # and left the decoder alone


def test_stop_event_stops_between_steps(cohort):
    stop = threading.Event()

    def callback(step, total, metrics):
        if step == 2:
            stop.set()

    result = pretrain(_pre_cfg("coral", ), [img.array for img, _ in cohort] * 3, callback, stop)
    assert result.history.stopped and len(result.history.steps) == 2


def test_unannotated_slices_never_enter_the_loss(cohort):
    img, lab = cohort[0]
    slices = annotated_from_labels(lab.array)[:2]
    garbage = lab.array.copy()
    others = [i for i in range(lab.shape[0]) if i not in slices]
    garbage[others] = 3  # whatever the unannotated slices hold must not matter
    cfg = FinetuneConfig(steps=3, batch_size=2, device="cpu")
    model = build_model(TINY)
    a = finetune(cfg, model, [img.array], [lab.array], [slices])
    b = finetune(cfg, model, [img.array], [garbage], [slices])
    assert a.history.metrics["loss"] == b.history.metrics["loss"]
    c = finetune(cfg, model, [img.array], [lab.array], [slices + others[:1]])
    assert c.history.metrics["loss"] != a.history.metrics["loss"]


def test_finetuning_learns_and_does_not_touch_its_input_model(cohort):
    img, lab = cohort[0]
    model = build_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = ([cohort[1][0].array], [cohort[1][1].array], [annotated_from_labels(cohort[1][1].array)])
    cfg = FinetuneConfig(steps=40, batch_size=4, lr=3e-3, validate_every=20, device="cpu")
    result = finetune(cfg, model, [img.array], [lab.array], [annotated_from_labels(lab.array)], validation=val)
    losses = result.history.metrics["loss"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert len(result.history.metrics["val_dice"]) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_frozen_encoder_keeps_its_weights_and_the_decoder_learns(cohort):
    img, lab = cohort[0]
    model = build_model(TINY)
    model.canonical_direction.copy_(torch.nn.functional.normalize(torch.ones(TINY.embedding_dim), dim=0))
    cfg = FinetuneConfig(steps=20, batch_size=4, lr=1e-2, device="cpu", validate_every=10, freeze_encoder=True)
    val = ([img.array], [lab.array], [annotated_from_labels(lab.array)])
    result = finetune(cfg, model, [img.array], [lab.array], [annotated_from_labels(lab.array)], validation=val)
    tuned = result.model
    for name, p in model.encoder.named_parameters():
        assert torch.equal(p, dict(tuned.encoder.named_parameters())[name]), name  # weights as they came
    assert not all(torch.equal(p, q) for p, q in zip(model.decoder.parameters(), tuned.decoder.parameters()))
    # BatchNorm statistics follow the fine-tuning images; no CORAL loss ran, so the direction is the model's
    stats = [k for k in model.encoder.state_dict() if k.endswith("running_mean")]
    assert stats and not torch.equal(model.encoder.state_dict()[stats[0]], tuned.encoder.state_dict()[stats[0]])
    assert torch.equal(tuned.canonical_direction, model.canonical_direction)
    assert all(p.requires_grad for p in tuned.parameters())  # frozen for that fine-tuning only
    assert len(result.history.metrics["val_dice"]) == 2


def test_a_probe_sees_checkpoints_in_evaluation_mode_and_changes_nothing(cohort):
    """finetune(probe=, probe_every=): called every k steps and after the last, on the model in evaluation
    mode (segmenting with it, as `coral bench lowlabel --score-every` does), and the fine-tuned model is the
    one a run without a probe gives, bit for bit."""
    img, lab = cohort[0]
    model = build_model(TINY)
    cfg = FinetuneConfig(steps=25, batch_size=4, lr=3e-3, validate_every=0, device="cpu", seed=3)
    args = (cfg, model, [img.array], [lab.array], [annotated_from_labels(lab.array)])
    seen = []

    def probe(step, net):
        seen.append((step, net.training))
        segment_volume(net, img.array, "cpu")

    plain, probed = finetune(*args).model, finetune(*args, probe=probe, probe_every=10).model
    assert seen == [(10, False), (20, False), (25, False)]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), probed.state_dict().values()))
    assert np.array_equal(segment_volume(plain, img.array, "cpu"), segment_volume(probed, img.array, "cpu"))


def test_an_encoder_frozen_for_the_first_steps_then_trains(cohort):
    """encoder_frozen_steps N: the decoder and head learn alone for N steps (the encoder's weights as they
    came, as a probe at step N sees), then everything trains; the CORAL loss waits for the encoder too."""
    img, lab = cohort[0]
    model = build_model(TINY)
    model.canonical_direction.copy_(torch.nn.functional.normalize(torch.ones(TINY.embedding_dim), dim=0))
    cfg = FinetuneConfig(steps=12, batch_size=4, lr=1e-2, device="cpu", validate_every=0, encoder_frozen_steps=8,
                         embedding_weight=0.1)
    at = {}

    def probe(step, net):
        at[step] = ({k: v.clone() for k, v in net.encoder.state_dict().items() if "running" not in k and "num_batches" not in k},
                    [p.clone() for p in net.decoder.parameters()])

    tuned = finetune(cfg, model, [img.array], [lab.array], [annotated_from_labels(lab.array)], probe=probe,
                     probe_every=8).model
    encoder_at_8, decoder_at_8 = at[8]
    before = model.encoder.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in encoder_at_8.items())  # frozen for 8 steps
    assert not all(torch.equal(p, q) for p, q in zip(decoder_at_8, model.decoder.parameters()))
    assert not all(torch.equal(v, tuned.encoder.state_dict()[k]) for k, v in encoder_at_8.items())  # then trained
    assert all(p.requires_grad for p in tuned.parameters())
    with pytest.raises(UserError, match="frozen steps"):
        FinetuneConfig(encoder_frozen_steps=-1)


def test_any_number_of_steps_fine_tunes(cohort):
    """Short schedules too: 10 steps once made the one-cycle schedule divide by zero."""
    img, lab = cohort[0]
    model = build_model(TINY)
    for steps in (1, 2, 9, 10, 11):
        cfg = FinetuneConfig(steps=steps, batch_size=2, device="cpu", validate_every=0)
        result = finetune(cfg, model, [img.array], [lab.array], [annotated_from_labels(lab.array)])
        assert len(result.history.metrics["loss"]) == steps and np.isfinite(result.history.metrics["loss"]).all()


def test_the_encoder_learning_rate_scale_scales_the_encoders_steps_only(cohort):
    """encoder_lr_scale 0.1: the encoder's first AdamW step is a tenth of the full rate's (Adam's step
    does not depend on the gradient's size), the decoder's is the same."""
    img, lab = cohort[0]
    model = build_model(TINY)
    slices = [annotated_from_labels(lab.array)]

    def first_step(scale):
        stop = threading.Event()
        cfg = FinetuneConfig(steps=10, batch_size=4, device="cpu", validate_every=0, encoder_lr_scale=scale)
        tuned = finetune(cfg, model, [img.array], [lab.array], slices, callback=lambda *_: stop.set(),
                         stop_event=stop).model
        return {n: (p - dict(model.named_parameters())[n]).detach() for n, p in tuned.named_parameters()}

    full, tenth = first_step(1.0), first_step(0.1)
    enc = [n for n in full if n.startswith("encoder.")]
    rest = [n for n in full if not n.startswith("encoder.")]
    assert enc and rest
    norm = lambda d, names: float(torch.sqrt(sum((d[n] ** 2).sum() for n in names)))  # noqa: E731
    assert norm(full, enc) > 0 and norm(tenth, enc) / norm(full, enc) == pytest.approx(0.1, rel=0.01)
    assert all(torch.allclose(full[n], tenth[n], atol=1e-7) for n in rest if n.startswith("decoder."))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="learning-rate scale"):
            FinetuneConfig(encoder_lr_scale=bad)


def test_a_cpu_step_too_large_for_the_memory_goes_in_pieces_or_is_refused(cohort, monkeypatch, capsys):
    """On the CPU the system kills a process that runs out of memory, so the step is planned first:
    in halved pieces when the whole batch would take more than half the free memory, refused when
    even one image would."""
    from coral_core import training
    from coral_core.training import training_bytes_per_image

    img, lab = cohort[0]
    per_image = training_bytes_per_image(TINY)
    assert per_image == 40 * 4 * 32 * 32
    ft = FinetuneConfig(steps=3, batch_size=4, device="cpu", validate_every=0)
    args = ([img.array], [lab.array], [annotated_from_labels(lab.array)])
    monkeypatch.setattr(training, "free_memory", lambda: 2 * 2 * per_image)  # half of it: two images
    result = finetune(ft, build_model(TINY), *args)
    assert len(result.history.steps) == 3 and "continuing with batches of 2" in capsys.readouterr().err
    volumes = [im.array for im, _ in cohort]
    pretrain(_pre_cfg("coral"), volumes)  # 8 slices, two views each: pieces of one slice fit
    err = capsys.readouterr().err
    assert "a step of 8 slices (two views each) needs" in err and "continuing with batches of 1" in err
    monkeypatch.setattr(training, "free_memory", lambda: per_image)  # half an image
    with pytest.raises(UserError, match="for a single slice, more than half of this machine.s free memory .*--image-size"):
        finetune(ft, build_model(TINY), *args)
    with pytest.raises(UserError, match="single slice \\(two views each\\)"):
        pretrain(_pre_cfg("coral"), volumes)
    monkeypatch.setattr(training, "free_memory", lambda: 1 << 40)
    finetune(ft, build_model(TINY), *args)
    assert "warning" not in capsys.readouterr().err


def test_finetuning_a_coral_model_keeps_its_embedding_in_slice_order():
    """With a canonical direction, fine-tuning also trains the CORAL loss on the image's
    slices: unseen subjects' slices stay in order along the (re-learned, unit) direction.
    Without a direction the extra loss is not used at all."""
    from coral_core.data import slice_positions
    from coral_core.embedding import ordinal_consistency
    from coral_core.phantom import make_phantom

    small = UNetConfig(base_filters=8, depth=3, image_size=48, embedding_dim=32)
    cohort = make_cohort(6, seed=21)
    pre = pretrain(PretrainConfig(method="coral", epochs=4, batch_size=16, device="cpu", model=small),
                   [image.array for image, _ in cohort]).model
    image, labels = (v.array for v in cohort[0])
    args = ([image], [labels], [annotated_from_labels(labels)[:3]])
    kept = finetune(FinetuneConfig(steps=40, batch_size=4, device="cpu", validate_every=0), pre, *args).model
    direction = kept.canonical_direction.numpy()
    assert abs(np.linalg.norm(direction) - 1) < 1e-5
    assert not np.allclose(direction, pre.canonical_direction.numpy())  # trained along
    for seed in (901, 902, 903):
        volume = make_phantom(seed)[0].array
        along = embed_volume(kept, volume, "cpu") @ direction
        assert ordinal_consistency(along, slice_positions(len(volume)).numpy()) > 0.9

    fresh = build_model(small)
    runs = [finetune(FinetuneConfig(steps=5, batch_size=4, device="cpu", embedding_weight=w), fresh, *args)
            for w in (0.0, 0.1)]
    assert runs[0].history.metrics["loss"] == runs[1].history.metrics["loss"]
    assert not runs[1].model.has_direction


def test_unlabelled_volumes_join_the_embedding_loss_whatever_the_init(cohort, monkeypatch):
    """Semi-supervised fine-tuning: the CORAL loss trains on the fine-tuning images' slices and
    the unlabelled volumes'; a model without a direction (random init) starts from a random one."""
    from coral_core import finetune as ft

    depths = []
    plain_init = ft._EmbeddingKeeper.__init__

    def recorded(self, model, images, config, run):
        depths.append([image.shape[0] for image in images])
        plain_init(self, model, images, config, run)

    monkeypatch.setattr(ft._EmbeddingKeeper, "__init__", recorded)
    (img, lab), *rest = cohort
    others = [image.array for image, _ in rest]
    args = ([img.array], [lab.array], [annotated_from_labels(lab.array)[:2]])
    fresh = build_model(TINY)
    runs = [finetune(FinetuneConfig(steps=3, batch_size=2, device="cpu", validate_every=0, embedding_weight=w),
                     fresh, *args, unlabelled=others) for w in (0.0, 0.1)]
    assert depths == [[img.array.shape[0], *(o.shape[0] for o in others)]]  # weight 0: no extra loss at all
    assert runs[1].model.has_direction and not runs[0].model.has_direction and not fresh.has_direction
    assert runs[0].history.metrics["loss"] != runs[1].history.metrics["loss"]  # the loss moved the shared encoder



def test_finetuning_on_pairs_prepared_at_the_model_size_trains_the_same_model(cohort):
    """`coral finetune` prepares large scans at the model's size as it reads them; the fine-tuned
    weights are those the full-resolution arrays give (CORAL loss on their slices included)."""
    from coral_core.data import prepare_labelled

    (img, lab), (other, _), _ = cohort
    slices = [annotated_from_labels(lab.array)[:3]]
    model = build_model(TINY)
    model.canonical_direction.copy_(torch.nn.functional.normalize(torch.randn(TINY.embedding_dim), dim=0))
    cfg = FinetuneConfig(steps=3, batch_size=2, device="cpu", validate_every=0)
    raw = finetune(cfg, model, [img.array], [lab.array], slices, unlabelled=[other.array])
    images, labels = prepare_labelled(img.array, lab.array, TINY.image_size)
    prepared = finetune(cfg, model, [images], [labels], slices, unlabelled=[other.array])
    assert raw.history.metrics["loss"] == prepared.history.metrics["loss"]
    for a, b in zip(raw.model.state_dict().values(), prepared.model.state_dict().values()):
        assert torch.equal(a, b)

def test_the_embedding_loss_can_run_on_every_kth_step_only(cohort, monkeypatch):
    """``embedding_every=k``: the CORAL loss on steps k, 2k, ... at k times the weight."""
    from torch.nn import functional as F

    from coral_core import finetune as ft
    from coral_core.errors import UserError

    weights = []
    plain_backward = ft._EmbeddingKeeper.backward

    def counted(self):
        weights.append(self.config.embedding_weight * self.config.embedding_every)
        plain_backward(self)

    monkeypatch.setattr(ft._EmbeddingKeeper, "backward", counted)
    model = build_model(TINY)
    model.canonical_direction.copy_(F.normalize(torch.randn(TINY.embedding_dim), dim=0))
    img, lab = cohort[0]
    cfg = FinetuneConfig(steps=7, batch_size=2, device="cpu", validate_every=0, embedding_every=3)
    finetune(cfg, model, [img.array], [lab.array], [annotated_from_labels(lab.array)[:2]])
    assert weights == pytest.approx([0.3, 0.3])  # steps 3 and 6
    with pytest.raises(UserError, match="interval >= 1"):
        FinetuneConfig(embedding_every=0)


def test_the_embedding_loss_can_use_one_view_per_slice(cohort, monkeypatch):
    """``embedding_views=1``: each step embeds one augmented view of each drawn slice (half
    the images of two views) and hands the loss (n, 1, D) features, one position per slice."""
    from torch.nn import functional as F

    from coral_core import finetune as ft
    from coral_core.errors import UserError
    from coral_core.losses import CoralLoss

    shapes = []
    plain_forward = CoralLoss.forward

    def recorded(self, features, positions):
        shapes.append((tuple(features.shape), tuple(positions.shape)))
        return plain_forward(self, features, positions)

    monkeypatch.setattr(CoralLoss, "forward", recorded)
    model = build_model(TINY)
    model.canonical_direction.copy_(F.normalize(torch.randn(TINY.embedding_dim), dim=0))
    img, lab = cohort[0]
    args = ([img.array], [lab.array], [annotated_from_labels(lab.array)[:2]])
    for views in (2, 1):
        cfg = FinetuneConfig(steps=2, batch_size=2, device="cpu", validate_every=0, embedding_batch=4,
                             embedding_views=views)
        result = finetune(cfg, model, *args)
        assert np.isfinite(result.history.metrics["loss"]).all()
    d = TINY.embedding_dim
    assert shapes == [((4, 2, d), (4,))] * 2 + [((4, 1, d), (4,))] * 2
    assert ft.FinetuneConfig.embedding_views == 2
    with pytest.raises(UserError, match="1 or 2"):
        FinetuneConfig(embedding_views=3)


def test_class_balanced_cross_entropy_matches_its_direct_form():
    """``balance_classes``: each pixel's cross-entropy weighted by sqrt(total / (present x count))
    of its class in the batch, averaged with those weights; ignored pixels and absent classes
    take no part; equal class counts give the plain loss."""
    from coral_core.finetune import class_balance_weights, segmentation_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)  # class 3 absent
    target[0, :2] = -1
    counts = {c: int((target == c).sum()) for c in range(4)}
    total, present = sum(counts.values()), sum(1 for n in counts.values() if n)
    w = {c: (total / (present * n)) ** 0.5 if n else 0.0 for c, n in counts.items()}
    assert class_balance_weights(target, 4).tolist() == pytest.approx([w[c] for c in range(4)])
    log_p = logits.log_softmax(1)
    num = den = 0.0
    for b, y, x in np.ndindex(*target.shape):
        c = int(target[b, y, x])
        if c >= 0:
            num += -w[c] * float(log_p[b, c, y, x])
            den += w[c]
    expected_ce = num / den
    plain_ce = segmentation_loss(logits, target, dice_weight=0.0)
    balanced_ce = segmentation_loss(logits, target, dice_weight=0.0, balance_classes=True)
    assert float(balanced_ce) == pytest.approx(expected_ce, rel=1e-6)
    assert float(balanced_ce) != pytest.approx(float(plain_ce), rel=1e-3)
    dice_part = segmentation_loss(logits, target) - plain_ce  # the Dice term is the same either way
    assert float(segmentation_loss(logits, target, balance_classes=True) - balanced_ce) == pytest.approx(float(dice_part))
    even = torch.arange(4).repeat(2, 3, 2)  # (2, 3, 8): every class equally often
    assert class_balance_weights(even, 4).tolist() == [1.0, 1.0, 1.0, 1.0]
    logits = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    assert float(segmentation_loss(logits, even, balance_classes=True)) == pytest.approx(
        float(segmentation_loss(logits, even)))


def test_labels_beyond_the_model_classes_are_refused(cohort):
    from coral_core.errors import UserError

    img, lab = cohort[0]
    with pytest.raises(UserError, match="4 classes"):
        finetune(FinetuneConfig(steps=1, device="cpu"), build_model(TINY), [img.array], [lab.array + 2], [[0]])
    below = lab.array.astype(np.int16)
    below[0, 0, 0] = -1  # was told as "labels hold values up to 3 but the model has 4 classes", which is no fault
    with pytest.raises(UserError, match=r"^labels hold the value -1, below 0 \(background\); labels are 0 to 3 for "
                                        r"this model's 4 classes: fix the labels$"):
        finetune(FinetuneConfig(steps=1, device="cpu"), build_model(TINY), [img.array], [below], [[0]])


def test_augmentation_moves_labels_with_images_and_repeats_with_a_seed():
    x = torch.zeros(4, 1, 32, 32)
    y = torch.zeros(4, 32, 32, dtype=torch.long)
    x[:, :, 8:16, 8:20] = 1.0
    y[:, 8:16, 8:20] = 2
    cfg = AugmentConfig(gamma=(1, 1), contrast=(1, 1), brightness=0.0, noise=0.0)
    xa, ya = augment_batch(x, y, cfg, torch.Generator().manual_seed(0))
    xb, yb = augment_batch(x, y, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    inside = ya == 2
    assert xa[:, 0][inside].mean() > 0.8 and xa[:, 0][~inside].mean() < 0.1
    assert not torch.equal(ya[0], ya[1])  # each sample its own warp


def test_segment_and_embed_keep_the_input_geometry():
    model = build_model(TINY)
    vol = np.random.rand(5, 37, 23).astype(np.float32)  # odd, non-square slices
    seg = segment_volume(model, vol, "cpu", batch_size=2)
    assert seg.shape == vol.shape and seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, segment_volume(model, vol, "cpu", batch_size=5))
    emb = embed_volume(model, vol, "cpu", batch_size=3)
    assert emb.shape == (5, 16) and np.isfinite(emb).all()


def test_preprocessing_on_the_device_gives_the_host_result():
    """The path a CUDA GPU takes (normalise and resample on the device), run on the CPU,
    labels every voxel as the host path does: the bundled model on a phantom at its own
    size and at a size that needs resampling, as int16 like most scanners write."""
    from torch.nn import functional as F

    from coral_core.checkpoint import bundled_model_path, load_checkpoint
    from coral_core.phantom import make_phantom

    model, _ = load_checkpoint(bundled_model_path())
    image = make_phantom(5)[0].array
    larger = F.interpolate(torch.from_numpy(image)[None], size=(150, 170), mode="bilinear")[0].numpy()
    for vol in (image, larger):
        vol = np.round(vol / np.abs(vol).max() * 3000).astype(np.int16)
        host = segment_volume(model, vol, "cpu", batch_size=4, on_device=False)
        device = segment_volume(model, vol, "cpu", batch_size=4, on_device=True)
        assert len(np.unique(host)) == 4  # every class present: a real comparison
        assert (host == device).mean() > 0.9999
        # on the device path the labels come back once, at the last batch; progress is still per batch
        steps = [(done, labels.copy()) for done, labels in
                 iter_segment_volume(model, vol, "cpu", batch_size=4, on_device=True)]
        assert [done for done, _ in steps] == list(range(4, vol.shape[0], 4)) + [vol.shape[0]]
        np.testing.assert_array_equal(steps[-1][1], device)
