"""Speed levers (channels_last, torch.compile, data kept on the device) change results by
rounding at most, leave models in the layout checkpoints need, and refuse unknown modes."""

import copy

import numpy as np
import pytest
import torch

from coral_core.checkpoint import bundled_model_path, load_checkpoint, save_checkpoint
from coral_core.errors import UserError
from coral_core.finetune import FinetuneConfig, finetune
from coral_core.infer import segment_volume
from coral_core.levers import AUTO_COMPILE_MIN_WORK, Levers, apply_compile, cpu_has_amx
from coral_core.model import UNetConfig, build_model
from coral_core.phantom import make_cohort
from coral_core.pretrain import PretrainConfig, pretrain

TINY = UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=16)


@pytest.fixture(autouse=True)
def float32_on_the_cpu(monkeypatch):
    """The levers compared here must agree to float32 rounding, so the CPU runs in float32
    unless a test asks for bf16 (on a CPU with AMX it is the default; see the last tests)."""
    import coral_core.levers as levers_module

    monkeypatch.setattr(levers_module, "cpu_has_amx", lambda: False)


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(3, seed=7)


def _pretrain(cohort, levers):
    cfg = PretrainConfig(method="coral", epochs=1, batch_size=8, device="cpu", model=TINY, levers=levers)
    return pretrain(cfg, [image.array for image, _ in cohort])


def _assert_same_training(a, b, rtol=1e-4, atol=1e-3):
    assert len(a.history.metrics["loss"]) == len(b.history.metrics["loss"]) > 2
    np.testing.assert_allclose(b.history.metrics["loss"], a.history.metrics["loss"], rtol=rtol)
    # Adam's normalised steps can turn rounding into up to one step of the learning rate (1e-3 for
    # these pretrainings) for a weight whose gradient is near zero; anything larger would be a real difference.
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=atol, msg=name)


def test_channels_last_and_data_on_device_pretrain_like_the_default(cohort, tmp_path):
    plain = _pretrain(cohort, Levers(channels_last=False))
    levered = _pretrain(cohort, Levers(channels_last=True, data_on_device=True))
    _assert_same_training(plain, levered)
    # weights are back in the default layout, so the model saves and loads as any other
    assert all(p.is_contiguous() for p in levered.model.parameters())
    path = save_checkpoint(tmp_path / "m.safetensors", levered.model)
    loaded, _ = load_checkpoint(path)
    torch.testing.assert_close(loaded.state_dict(), levered.model.state_dict())


def test_prefetching_the_next_batch_changes_nothing_but_the_order_of_work(cohort, tmp_path):
    """``prefetch`` fetches step k+1's batch during step k (pinned copies on CUDA): the same
    steps, losses and weights bit for bit, over epoch ends and a stop and resume mid-epoch."""
    import threading

    from coral_core.resume import ResumeState

    images = [image.array for image, _ in cohort]

    def config(prefetch):
        return PretrainConfig(method="coral", epochs=3, batch_size=8, device="cpu", model=TINY,
                              levers=Levers(prefetch=prefetch))

    from coral_core import pretrain as pretrain_module

    events = []
    fetch = pretrain_module._Batches.__call__

    def recorded(self, idx, idx_dev):
        events.append(("fetch", idx[0].item()))
        assert torch.equal(idx, idx_dev.cpu())
        return fetch(self, idx, idx_dev)

    plain = pretrain(config(False), images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module._Batches, "__call__", recorded)
        ahead = pretrain(config(True), images, lambda step, total, m: events.append(("report", step)))
    per_epoch = len(plain.history.steps) // 3
    # step 1's report comes after step 2's batch was fetched: the next batch is fetched during the step
    assert events[:3] == [events[0], events[1], ("report", 1)] and events[1][0] == "fetch"
    assert sum(e[0] == "fetch" for e in events) == len(plain.history.steps)  # each batch once, none wasted
    assert events.index(("report", per_epoch)) < [i for i, e in enumerate(events) if e[0] == "fetch"][per_epoch]
    assert len(plain.history.steps) > 6
    assert ahead.history.metrics == plain.history.metrics
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), ahead.model.state_dict().items()):
        assert torch.equal(a, b), name

    stop_at = len(plain.history.steps) // 2 + 1
    event = threading.Event()
    state = ResumeState(tmp_path / "r.safetensors", {"method": "coral"}, every=0)
    pretrain(config(True), images, lambda step, total, m: step == stop_at and event.set(), event, resume=state)
    resumed = pretrain(config(True), images, resume=state)
    assert resumed.history.metrics["loss"] == plain.history.metrics["loss"][stop_at:]


def test_deferred_metrics_are_the_same_metrics_one_step_later(cohort, tmp_path):
    """``defer_metrics`` reports step k after step k + 1 has run (on CUDA: been queued): the same
    history and weights bit for bit, the last step reported too, and a stop asked for in step k's
    report ends the run after step k + 1, which a resume continues from."""
    import threading

    from coral_core import pretrain as pretrain_module
    from coral_core.resume import ResumeState

    images = [image.array for image, _ in cohort]

    def config(defer, prefetch=False):
        return PretrainConfig(method="coral", epochs=2, batch_size=8, device="cpu", model=TINY,
                              levers=Levers(defer_metrics=defer, prefetch=prefetch))

    events = []
    step_of = pretrain_module.accumulate

    def recorded(*args, **kwargs):
        events.append("step")
        return step_of(*args, **kwargs)

    plain = pretrain(config(False), images)
    total = len(plain.history.steps)
    assert total > 4
    for prefetch in (False, True):
        events.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pretrain_module, "accumulate", recorded)
            deferred = pretrain(config(True, prefetch), images, lambda step, t, m: events.append(step))
        # step 1 is reported after step 2 ran, ..., the last one after the loop
        assert events == ["step", "step", 1] + [x for k in range(2, total) for x in ("step", k)] + [total]
        assert deferred.history.steps == plain.history.steps and deferred.history.metrics == plain.history.metrics
        for (name, a), (_, b) in zip(plain.model.state_dict().items(), deferred.model.state_dict().items()):
            assert torch.equal(a, b), name

    stop_at = total // 2
    event = threading.Event()
    state = ResumeState(tmp_path / "r.safetensors", {"method": "coral"}, every=0)
    stopped = pretrain(config(True), images, lambda step, t, m: step == stop_at and event.set(), event, resume=state)
    assert stopped.history.stopped and stopped.history.steps[-1] == stop_at + 1  # the step already run is reported
    resumed = pretrain(config(True), images, resume=state)
    assert resumed.history.metrics["loss"] == plain.history.metrics["loss"][stop_at + 1:]
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), resumed.model.state_dict().values()))


def test_channels_last_finetunes_and_segments_like_the_default(cohort):
    image, labels = (v.array for v in cohort[0])
    slices = [[2, 6, 9]]
    torch.manual_seed(0)
    start = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=4))
    results = [
        finetune(FinetuneConfig(steps=6, batch_size=4, device="cpu", validate_every=0, levers=levers),
                 start, [image], [labels], slices)
        for levers in (Levers(channels_last=False), Levers(channels_last=True))
    ]
    # Fine-tuning peaks at lr 3e-3, and after the first step (equal to 3e-8 here) a few weights with near-zero
    # gradients took Adam's step either way (3.5e-3 after two steps), which the next steps spread: up to 7e-3
    # after six, where the losses still agree to 1e-4. (With shifts of 0.08 no weight happened to be there.)
    _assert_same_training(*results, atol=3 * FinetuneConfig.lr)
    model = results[0].model
    plain = segment_volume(model, image, "cpu", batch_size=4, levers=Levers(channels_last=False))
    levered = segment_volume(model.to(memory_format=torch.contiguous_format), image, "cpu", batch_size=4,
                             levers=Levers(channels_last=True))
    assert (plain == levered).mean() > 0.999


def test_padded_channels_compute_the_same_with_the_same_parameters(cohort, tmp_path):
    """``pad_channels`` pads a convolution's input and weight by zero channels to 8: the same
    outputs and gradients, the same parameters; it is undone before a model is returned."""
    from torch import nn

    from coral_core.levers import apply_layout, set_channel_padding
    from coral_core.model import ChannelPaddedConv2d

    torch.manual_seed(0)
    model = build_model(UNetConfig(base_filters=16, image_size=32, n_classes=4))
    x = torch.randn(3, 1, 32, 32)
    plain_out = model(x)
    plain_out.square().mean().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "encoder.blocks.0.0.weight" in plain_grads
    model.zero_grad()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    set_channel_padding(model, True, channels_last=True)
    padded = [m for m in model.modules() if isinstance(m, ChannelPaddedConv2d)]
    assert [m.in_channels for m in padded] == [1]  # the first convolution: every other one has 16 or more
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    out = model(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, plain_out, rtol=1e-4, atol=1e-5)  # float32 rounding: another kernel sums
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    apply_layout(model, Levers())  # set either way: the defaults turn it off
    assert not any(isinstance(m, ChannelPaddedConv2d) for m in model.modules())
    assert type(model.encoder.blocks[0][0]) is nn.Conv2d

    plain = _pretrain(cohort, Levers())
    levered = _pretrain(cohort, Levers(pad_channels=True))
    _assert_same_training(plain, levered)
    assert not any(isinstance(m, ChannelPaddedConv2d) for m in levered.model.modules())  # returned as built
    image = cohort[1][0].array
    for fuse in (False, True):  # folding BatchNorm keeps the padding of the convolution it folds into
        a = segment_volume(levered.model, image, "cpu", batch_size=4, levers=Levers(fuse_batchnorm=fuse))
        b = segment_volume(levered.model, image, "cpu", batch_size=4, levers=Levers(fuse_batchnorm=fuse, pad_channels=True))
        assert (a == b).mean() > 0.999


def test_compiled_pretraining_and_inference_match_eager(cohort):
    """torch.compile (the inductor backend, C++ on the CPU) gives the eager results."""
    try:
        compiled = _pretrain(cohort, Levers(compile="default"))
    except Exception as exc:  # torch 2.7.1 wrote C++ for this backward that g++ rejected, on an AVX-512 CPU
        if "CppCompileError" not in str(exc):
            raise
        pytest.skip(f"torch {torch.__version__}'s compiler failed here: {str(exc).strip().splitlines()[0][:120]}")
    _assert_same_training(_pretrain(cohort, Levers()), compiled)
    torch.manual_seed(0)
    model = build_model(TINY)
    image = cohort[1][0].array
    eager = segment_volume(model, image, "cpu", batch_size=4)
    compiled = segment_volume(model, image, "cpu", batch_size=4, levers=Levers(compile="default"))
    assert (eager == compiled).mean() > 0.999


def test_channels_last_by_default_where_it_was_measured():
    """On where it was measured to help (the CPU, an H100); off elsewhere."""
    assert Levers().channels_last_on(torch.device("cpu"))
    assert Levers().channels_last_on(torch.device("cuda"))
    assert not Levers().channels_last_on(torch.device("mps"))
    assert not Levers(channels_last=False).channels_last_on(torch.device("cpu"))
    assert Levers(channels_last=True).channels_last_on(torch.device("mps"))
    model = build_model(TINY)
    segment_volume(model, np.random.rand(3, 32, 32).astype(np.float32), "cpu", levers=Levers(fuse_batchnorm=False))
    assert model.encoder.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def _with_batch_statistics(model):
    """BatchNorm layers with statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            module.weight.data.uniform_(0.5, 1.5, generator=g)
            module.bias.data.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def test_batchnorm_folding_gives_the_same_segmentation_and_embedding(cohort):
    """Inference on a copy whose BatchNorm layers are folded into the convolutions: the labels
    and embeddings of the model as it is, and the model itself left untouched. On by default on
    the CPU, where it was measured faster."""
    from coral_core.infer import embed_volume
    from coral_core.levers import for_inference

    assert Levers().fuse_batchnorm_on(torch.device("cpu")) and not Levers().fuse_batchnorm_on(torch.device("cuda"))
    torch.manual_seed(0)
    model = _with_batch_statistics(build_model(TINY))
    image = cohort[1][0].array
    plain, folded = Levers(fuse_batchnorm=False), Levers(fuse_batchnorm=True)
    assert (segment_volume(model, image, "cpu", 4, levers=folded) == segment_volume(model, image, "cpu", 4, levers=plain)).mean() > 0.999
    np.testing.assert_allclose(embed_volume(model, image, "cpu", levers=folded), embed_volume(model, image, "cpu", levers=plain),
                               rtol=1e-4, atol=1e-5)
    fused = for_inference(model, folded, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2 * (2 * TINY.depth + 1)
    instance = build_model(UNetConfig(base_filters=4, image_size=32, norm="instance"))
    assert for_inference(instance, folded, torch.device("cpu")) is not instance  # a copy, with nothing to fold
    assert for_inference(model, plain, torch.device("cpu")) is model


def test_auto_compiles_long_pretraining_on_a_gpu_only():
    """Compiling costs tens of seconds: "auto" spends them only where a run wins them back."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = Levers()
    assert auto.compile == "auto"
    # 1300 steps of 64 slices at 352 x 352 compile; the same steps at 128 x 128 do not
    assert 1300 * 64 * 352**2 >= AUTO_COMPILE_MIN_WORK > 1300 * 64 * 128**2
    assert auto.compile_mode(cuda, pretraining=True, work=AUTO_COMPILE_MIN_WORK) == "default"
    assert auto.compile_mode(cuda, pretraining=True, work=AUTO_COMPILE_MIN_WORK - 1) == "off"
    assert auto.compile_mode(cuda, pretraining=False, work=1e15) == "off"  # inference, fine-tuning
    assert auto.compile_mode(cpu, pretraining=True, work=1e15) == "off"
    assert Levers(compile="off").compile_mode(cuda, pretraining=True, work=1e15) == "off"
    assert Levers(compile="reduce-overhead").compile_mode(cpu) == "reduce-overhead"


def test_auto_compile_that_fails_goes_on_eagerly(monkeypatch):
    """A compiler that breaks on the first call (say no Triton for this GPU) costs a warning,
    not the run; an explicitly asked-for mode is not second-guessed."""

    class Broken:
        calls = 0

        def __call__(self, *args, **kwargs):
            Broken.calls += 1
            raise RuntimeError("backend compiler failed: no working triton for this device\nmore detail")

    model = build_model(TINY).eval()
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: Broken())
    monkeypatch.setattr(Levers, "compile_mode", lambda self, *a, **k: "default")
    run = apply_compile(model, Levers())
    x = torch.rand(2, 1, TINY.image_size, TINY.image_size)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(backend compiler failed: no working triton"):
        out = run(x)
    torch.testing.assert_close(out, model(x))
    run(x)  # eager from then on, without trying again
    assert Broken.calls == 1
    explicit = apply_compile(model, Levers(compile="default"))
    with pytest.raises(RuntimeError, match="backend compiler failed"):
        explicit(x)


class _BackwardFails(torch.autograd.Function):
    """The identity, whose backward fails as torch's compiled backward does when g++ rejects the C++ written for it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("CppCompileError: C++ compile error\nconflicting declaration")


def test_auto_compile_whose_backward_fails_goes_on_eagerly(monkeypatch):
    """torch compiles the backward at the first backward, after the compiled module's call: "auto" tries a
    forward and backward of its own in that call, so that a backward that does not compile costs a warning, not
    the run. The failed try counts no BatchNorm statistics and leaves no gradient."""
    torch.manual_seed(0)
    model = build_model(TINY).encoder.train()
    x = torch.rand(4, 1, TINY.image_size, TINY.image_size)
    reference = copy.deepcopy(model)
    reference(x)[-1].sum().backward()
    monkeypatch.setattr(Levers, "compile_mode", lambda self, *a, **k: "default")
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: lambda v: [_BackwardFails.apply(t) for t in module(v)])
    run = apply_compile(model, Levers())
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(CppCompileError: C\+\+ compile error\)"):
        out = run(x)[-1]
    assert all(p.grad is None for p in model.parameters())
    for ours, theirs in zip(model.buffers(), reference.buffers()):  # one forward's statistics, as eager
        torch.testing.assert_close(ours, theirs)
    out.sum().backward()  # the eager graph
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_auto_compile_that_works_trains_as_eager(cohort, monkeypatch):
    """The try of a backward on the first call leaves the training as it was: a second backward through the
    caller's own graph instead (``retain_graph``) gave gradients off by up to 5.6 times their size in
    torch 2.13's compiled backward."""
    eager = _pretrain(cohort, Levers(compile="off"))
    monkeypatch.setattr(Levers, "compile_mode", lambda self, *a, **k: "default")
    _assert_same_training(eager, _pretrain(cohort, Levers()))  # or eager again, if torch's compiler fails here


def test_unknown_compile_mode_is_a_user_error():
    with pytest.raises(UserError, match="--compile fast: unknown mode"):
        Levers(compile="fast")


def test_configs_rebuild_from_their_plain_dict_form():
    """The plugin sends configs to its training process as plain dicts."""
    from dataclasses import asdict

    ft = FinetuneConfig(steps=7, levers=Levers(channels_last=False, compile="default"))
    assert FinetuneConfig(**asdict(ft)) == ft
    pre = PretrainConfig(method="pcl", model=TINY, levers=Levers(data_on_device=True))
    assert PretrainConfig(**asdict(pre)) == pre


def test_cpu_bf16_is_on_by_default_only_where_the_cpu_has_amx(monkeypatch):
    import coral_core.levers as levers_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for has_amx in (False, True):
        monkeypatch.setattr(levers_module, "cpu_has_amx", lambda: has_amx)
        assert Levers(cpu_bf16=None).cpu_bf16_on(cpu) is has_amx
    assert Levers(cpu_bf16=True).cpu_bf16_on(cpu) and not Levers(cpu_bf16=False).cpu_bf16_on(cpu)
    assert not Levers(cpu_bf16=True).cpu_bf16_on(cuda)  # CUDA takes the configs' amp flag, as before
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch 2.2 has none
    assert cpu_has_amx() is (bool(probe()) if probe else False)  # the real probe, not the fixture's
    # what `coral bench speed --levers` compares on a CPU with AMX: the defaults in float32 and in bf16
    from dataclasses import replace

    from coral_core.levers import LEVER_VARIANTS

    assert LEVER_VARIANTS["defaults + float32"] == replace(Levers(), cpu_bf16=False)
    assert not LEVER_VARIANTS["defaults + float32"].cpu_bf16_on(cpu) and LEVER_VARIANTS["defaults + cpu_bf16"].cpu_bf16_on(cpu)


def test_cpu_bf16_runs_the_convolutions_in_bf16_and_rounds_no_more(cohort):
    """With the lever, fine-tuning, pretraining and inference autocast to bf16 on the CPU (the
    convolutions' outputs are bf16), and the results differ from float32 by rounding: losses
    within a few percent, labels alike on almost every voxel. ``amp=False`` still means float32."""
    image, labels = (v.array for v in cohort[0])
    torch.manual_seed(0)
    start = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=4))
    seen: list[torch.dtype] = []
    hook = start.encoder.blocks[0][0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))

    def tune(levers, amp=True):
        seen.clear()
        cfg = FinetuneConfig(steps=6, batch_size=4, device="cpu", validate_every=0, levers=levers, amp=amp)
        result = finetune(cfg, start, [image], [labels], [[2, 6, 9]])
        return result, set(seen)

    (fp32, fp32_types), (bf16, bf16_types) = tune(Levers(cpu_bf16=False)), tune(Levers(cpu_bf16=True))
    (off, off_types) = tune(Levers(cpu_bf16=True), amp=False)
    hook.remove()
    assert fp32_types == off_types == {torch.float32} and bf16_types == {torch.bfloat16}
    np.testing.assert_allclose(bf16.history.metrics["loss"], fp32.history.metrics["loss"], rtol=0.05)
    assert bf16.history.metrics["loss"] != fp32.history.metrics["loss"]
    assert off.history.metrics["loss"] == fp32.history.metrics["loss"]

    pre32, pre16 = (_pretrain(cohort, Levers(cpu_bf16=flag)) for flag in (False, True))
    np.testing.assert_allclose(pre16.history.metrics["loss"], pre32.history.metrics["loss"], rtol=0.05)
    assert pre16.history.metrics["loss"] != pre32.history.metrics["loss"]

    x = torch.rand(4, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert start.encoder(x)[-1].dtype == torch.bfloat16
        assert start.embed(x).dtype == torch.float32  # the projection head runs in float32 (docs/performance.md)

    model, _ = load_checkpoint(bundled_model_path())
    at = {flag: segment_volume(model, image, "cpu", 8, levers=Levers(cpu_bf16=flag)) for flag in (False, True)}
    assert len(np.unique(at[False])) == 4 and (at[True] == at[False]).mean() > 0.99


def test_the_folded_copy_is_reused_until_the_weights_change(cohort):
    """Folding costs about 20 ms for the demo model: a model segmented again reuses its folded
    copy, and any change to its weights (an optimiser step, a write through ``.data``, new
    BatchNorm statistics) makes a new one, so results always follow the model as it is now."""
    from coral_core.levers import for_inference

    cpu, folded = torch.device("cpu"), Levers(fuse_batchnorm=True)
    torch.manual_seed(0)
    model = _with_batch_statistics(build_model(TINY))
    image = cohort[1][0].array
    first = for_inference(model, folded, cpu)
    assert for_inference(model, folded, cpu) is first
    changes = [
        lambda: torch.optim.SGD(model.parameters(), lr=0.1).step(),
        lambda: model.encoder.blocks[0][0].weight.data.mul_(1.5),
        lambda: model.encoder.blocks[0][1].running_mean.add_(0.3),
    ]
    for i, change in enumerate(changes):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        before = for_inference(model, folded, cpu)
        change()
        after = for_inference(model, folded, cpu)
        assert after is not before, i
        plain = segment_volume(model, image, "cpu", 4, levers=Levers(fuse_batchnorm=False, channels_last=False))
        assert (segment_volume(model, image, "cpu", 4, levers=folded) == plain).mean() > 0.999, i
