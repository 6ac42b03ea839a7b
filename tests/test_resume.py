"""Resuming stopped runs, and carrying on when the device runs out of memory."""

import queue
import threading

import numpy as np
import pytest
import torch

from coral_core.device import OutOfMemoryError
from coral_core.errors import UserError
from coral_core.finetune import FinetuneConfig, annotated_from_labels, finetune
from coral_core.infer import embed_volume, segment_volume
from coral_core.model import Encoder, UNetConfig, build_model
from coral_core.phantom import make_cohort
from coral_core.pretrain import PretrainConfig, pretrain
from coral_core.resume import ResumeState, resume_path
from coral_core.training import TrainingRun, accumulate

TINY = UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=16)


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(3, seed=5)


def _stop_at(step_to_stop: int):
    event = threading.Event()

    def callback(step, total, metrics):
        if step == step_to_stop:
            event.set()

    return event, callback


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_path_sits_next_to_the_output(tmp_path):
    assert resume_path(tmp_path / "m.safetensors") == tmp_path / "m.resume.safetensors"


@pytest.mark.parametrize("every", [0, 2])
def test_stopped_pretraining_resumes_to_the_uninterrupted_result(cohort, tmp_path, every):
    images = [img.array for img, _ in cohort]
    cfg = PretrainConfig(method="coral", epochs=3, batch_size=8, device="cpu", model=TINY)
    full = pretrain(cfg, images)
    total = len(full.history.steps)
    state = ResumeState(tmp_path / "r.safetensors", {"method": "coral"}, every=every)
    event, callback = _stop_at(total // 2 + 1)  # mid-epoch
    first = pretrain(cfg, images, callback, event, resume=state)
    assert first.history.stopped and state.exists()
    second = pretrain(cfg, images, resume=state)
    assert second.history.steps[0] == total // 2 + 2 and second.history.steps[-1] == total
    assert _same_weights(second.model, full.model)
    assert np.allclose(second.history.metrics["loss"], full.history.metrics["loss"][total // 2 + 1 :])


@pytest.mark.parametrize("pretrained", [False, True])
def test_stopped_finetuning_resumes_to_the_uninterrupted_result(cohort, tmp_path, pretrained):
    """Also for a model with a canonical direction, whose fine-tuning adds the CORAL loss
    (its direction and random streams are in the resume file too)."""
    img, lab = cohort[0]
    args = ([img.array], [lab.array], [annotated_from_labels(lab.array)])
    model = build_model(TINY)
    if pretrained:
        model.canonical_direction.copy_(torch.nn.functional.normalize(torch.randn(TINY.embedding_dim), dim=0))
    cfg = FinetuneConfig(steps=12, batch_size=4, device="cpu")
    full = finetune(cfg, model, *args)
    state = ResumeState(tmp_path / "r.safetensors", {"steps": 12}, every=5)
    event, callback = _stop_at(7)
    first = finetune(cfg, model, *args, callback=callback, stop_event=event, resume=state)
    assert first.history.steps[-1] == 7 and first.history.stopped
    second = finetune(cfg, model, *args, resume=state)
    assert second.history.steps == list(range(8, 13))
    assert _same_weights(second.model, full.model)


def test_resume_refuses_a_file_from_other_options_or_a_damaged_one(cohort, tmp_path):
    img, lab = cohort[0]
    args = ([img.array], [lab.array], [annotated_from_labels(lab.array)])
    path = tmp_path / "r.safetensors"
    event, callback = _stop_at(2)
    finetune(FinetuneConfig(steps=5, batch_size=2, device="cpu"), build_model(TINY), *args,
             callback=callback, stop_event=event, resume=ResumeState(path, {"lr": 0.001}))
    with pytest.raises(UserError, match=r"r\.safetensors: was written by a run with other options \(lr\)"):
        finetune(FinetuneConfig(steps=5, batch_size=2, device="cpu"), build_model(TINY), *args,
                 resume=ResumeState(path, {"lr": 0.01}))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"r\.safetensors: .*delete it to start afresh"):
        finetune(FinetuneConfig(steps=5, batch_size=2, device="cpu"), build_model(TINY), *args,
                 resume=ResumeState(path, {"lr": 0.001}))


class _SmallDevice:
    """Makes the U-Net encoder raise CUDA's out-of-memory error above ``limit`` samples.

    Every path (segmentation, embedding, the pretraining embedder) runs the encoder once per batch.
    """

    def __init__(self, monkeypatch, limit: int) -> None:
        self.sizes: list[int] = []
        original_forward = Encoder.forward

        def forward(encoder, x):
            self.sizes.append(x.shape[0])
            if x.shape[0] > limit:
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original_forward(encoder, x)

        monkeypatch.setattr(Encoder, "forward", forward)


def test_out_of_memory_halves_the_finetuning_batch_and_goes_on(cohort, monkeypatch, capsys):
    img, lab = cohort[0]
    device = _SmallDevice(monkeypatch, limit=3)
    result = finetune(FinetuneConfig(steps=4, batch_size=8, device="cpu"), build_model(TINY),
                      [img.array], [lab.array], [annotated_from_labels(lab.array)])
    assert len(result.history.steps) == 4 and np.isfinite(result.history.metrics["loss"]).all()
    assert device.sizes[:4] == [8, 4, 2, 2]  # 8 fails, 4 fails, then pieces of 2 cover all 8
    assert set(device.sizes[4:]) == {2} and len(device.sizes) == 2 + 4 * 4
    assert "out of memory" in capsys.readouterr().err


def test_out_of_memory_halves_the_pretraining_batch_and_goes_on(cohort, monkeypatch):
    device = _SmallDevice(monkeypatch, limit=8)  # 2 views x 8 slices = 16 fail; 2 x 4 fit
    result = pretrain(PretrainConfig(method="coral", epochs=1, batch_size=8, device="cpu", model=TINY),
                      [img.array for img, _ in cohort])
    assert np.isfinite(result.history.metrics["loss"]).all()
    assert device.sizes[:3] == [16, 8, 8]


def test_out_of_memory_under_ddp_is_an_error_not_a_lone_halving():
    """One DDP process halving its batch alone would leave the others waiting in a collective."""
    run = TrainingRun(0, "cpu", False, None, None)
    weight = torch.nn.Parameter(torch.ones(3))
    calls = []

    def step_loss(part, w):
        calls.append(part)
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(UserError, match="ran out of memory with 16 samples per process; lower --batch-size"):
        accumulate(run, torch.optim.SGD([weight], lr=0.1), 16, step_loss, distributed=True)
    assert calls == [slice(0, 16)] and run.micro_batch is None


def test_out_of_memory_on_one_sample_is_one_clear_sentence(cohort, monkeypatch):
    img, lab = cohort[0]
    _SmallDevice(monkeypatch, limit=0)
    with pytest.raises(UserError, match="ran out of memory even for one sample; use a smaller"):
        finetune(FinetuneConfig(steps=2, batch_size=2, device="cpu"), build_model(TINY),
                 [img.array], [lab.array], [annotated_from_labels(lab.array)])


def test_inference_in_chunks_and_after_out_of_memory_matches_one_big_batch(cohort, monkeypatch):
    img, _ = cohort[1]
    volume = np.concatenate([img.array] * 3)  # a long volume
    model = build_model(TINY).eval()
    reference = segment_volume(model, volume, batch_size=len(volume))
    reference_emb = embed_volume(model, volume, batch_size=len(volume))
    device = _SmallDevice(monkeypatch, limit=5)
    assert np.array_equal(segment_volume(model, volume, batch_size=64), reference)
    assert device.sizes[:4] == [len(volume), 32, 16, 8] and max(s for s in device.sizes if s <= 5) == 4
    assert np.allclose(embed_volume(model, volume, batch_size=16), reference_emb, atol=1e-5)


def test_out_of_memory_in_the_embedding_loss_names_the_switch(cohort, monkeypatch):
    """Fine-tuning a CORAL model also embeds 2 x 8 views a step; if only that runs out of
    memory, the sentence says how to go without it."""
    img, lab = cohort[0]
    model = build_model(TINY)
    model.canonical_direction.copy_(torch.nn.functional.normalize(torch.randn(TINY.embedding_dim), dim=0))
    _SmallDevice(monkeypatch, limit=8)  # the segmentation batch of 2 fits, the 16 views do not
    with pytest.raises(UserError, match="out of memory for the loss that keeps the embedding.*--embedding-weight 0"):
        finetune(FinetuneConfig(steps=2, batch_size=2, device="cpu"), model,
                 [img.array], [lab.array], [annotated_from_labels(lab.array)])


class _JobMessages(queue.Queue):
    """A plugin job's messages; Cancel is pressed when step ``stop_at`` is reported."""

    def __init__(self, stop_at):
        super().__init__()
        self.stop_at, self.stop = stop_at, threading.Event()

    def put(self, message, *args, **kwargs):
        super().put(message, *args, **kwargs)
        if message[0] == "progress" and message[1] == self.stop_at:
            self.stop.set()


def test_the_plugins_pretraining_job_continues_where_it_stopped(cohort, tmp_path, monkeypatch):
    """The Model widget's job (napari_coral._jobs, run here in this process): Cancel (or a crash,
    or closing napari) keeps the progress; the same images with the same settings continue it to
    the uninterrupted result, and the progress file goes once the job is done. Other images or
    settings get another file."""
    from coral_core.checkpoint import load_checkpoint
    from napari_coral._jobs import _pretrain, config_dict, resume_file, write_inputs

    monkeypatch.setenv("NAPARI_CORAL_HOME", str(tmp_path / "home"))
    cfg = PretrainConfig(method="coral", epochs=3, batch_size=8, device="cpu", model=TINY)
    volumes = {f"v{i:04d}": img.array for i, (img, _) in enumerate(cohort)}
    resume, _ = resume_file("pretrain", config_dict(cfg), volumes)
    assert resume.parent == tmp_path / "home" / "resume"
    other_volumes = dict(volumes, v0000=volumes["v0000"] + 1)
    assert resume_file("pretrain", config_dict(cfg), other_volumes)[0] != resume
    longer = PretrainConfig(method="coral", epochs=4, batch_size=8, device="cpu", model=TINY)
    assert resume_file("pretrain", config_dict(longer), volumes)[0] != resume
    data = write_inputs(tmp_path, **volumes)

    def job(out, stop_at=None, with_resume=True):
        messages = _JobMessages(stop_at)
        spec = {"data": str(data), "out": str(tmp_path / out), "config": config_dict(cfg)}
        if with_resume:  # the job names its progress file itself, in this folder
            spec |= {"resume_folder": str(resume.parent)}
        _pretrain(spec, messages, messages.stop)
        reports = list(messages.queue)
        return [m[1] for m in reports if m[0] == "progress"], reports[-1]

    full_steps, _ = job("full.safetensors", with_resume=False)
    steps, done = job("first.safetensors", stop_at=4)
    assert steps[-1] == 4 and done[2] is True and resume.exists()  # stopped: the progress is kept
    steps, done = job("second.safetensors")
    assert steps[0] == 5 and steps[-1] == full_steps[-1] and done[2] is False
    assert not resume.exists()  # done: nothing left behind
    assert _same_weights(load_checkpoint(tmp_path / "second.safetensors")[0],
                         load_checkpoint(tmp_path / "full.safetensors")[0])


def test_the_plugins_finetuning_job_continues_where_it_stopped(cohort, tmp_path, monkeypatch):
    """The Fine-tune widget's job: Cancel keeps the progress; the same start model, annotations
    and settings continue it to the uninterrupted result, and the file goes once the job is done.
    Other annotations start afresh, in a file of their own, which the Model panel lists."""
    from coral_core.checkpoint import load_checkpoint, save_checkpoint
    from napari_coral._jobs import _finetune, config_dict, resume_folder, stopped_runs, write_inputs

    monkeypatch.setenv("NAPARI_CORAL_HOME", str(tmp_path / "home"))
    img, lab = cohort[0]
    slices = annotated_from_labels(lab.array)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "start.safetensors", build_model(TINY), {})
    cfg = FinetuneConfig(steps=12, batch_size=4, device="cpu")

    def inputs(folder, labels):
        folder.mkdir(exist_ok=True)
        return write_inputs(folder, image=img.array.astype(np.float32), labels=labels, slices=np.asarray(slices),
                            val_slices=np.zeros(0, dtype=np.int64))

    same, other = inputs(tmp_path / "a", lab.array), inputs(tmp_path / "b", np.where(lab.array == 1, 2, lab.array))

    def job(out, data=same, stop_at=None, with_resume=True):
        messages = _JobMessages(stop_at)
        spec = {"data": str(data), "out": str(tmp_path / out), "model": str(tmp_path / "start.safetensors"),
                "config": config_dict(cfg)}
        if with_resume:
            spec |= {"resume_folder": str(resume_folder())}
        _finetune(spec, messages, messages.stop)
        reports = list(messages.queue)
        return [m[1] for m in reports if m[0] == "progress"], reports[-1]

    full_steps, _ = job("full.safetensors", with_resume=False)
    assert stopped_runs() == []
    steps, done = job("first.safetensors", stop_at=7)
    assert steps[-1] == 7 and done[2] is True
    kept = stopped_runs()
    assert len(kept) == 1 and kept[0].name.startswith("finetune-")
    job("other.safetensors", data=other, stop_at=3)  # other annotations: a file of their own
    assert len(stopped_runs()) == 2
    steps, done = job("second.safetensors")
    assert steps == list(range(8, 13)) and done[2] is False
    assert kept[0] not in stopped_runs() and len(stopped_runs()) == 1  # done: its file went, the other stays
    assert _same_weights(load_checkpoint(tmp_path / "second.safetensors")[0],
                         load_checkpoint(tmp_path / "full.safetensors")[0])


def test_a_job_writes_its_inputs_on_its_own_thread_and_a_cancel_before_training_trains_nothing(tmp_path, monkeypatch):
    """The plugin hands a job the arrays to train on; the job writes them (0.8-2.9 s per GB)
    on its own thread, so the caller (napari's GUI thread) returns at once. Cancel during the
    write ends the job as stopped, with nothing trained."""
    import time

    import napari_coral._jobs as jobs

    writers, gate, real = [], threading.Event(), jobs.write_inputs

    def slow_write(folder, **arrays):
        writers.append(threading.current_thread())
        assert gate.wait(30)
        return real(folder, **arrays)

    monkeypatch.setattr(jobs, "write_inputs", slow_write)
    out = tmp_path / "m.safetensors"
    job = jobs.Job("pretrain", {"out": str(out), "config": {}}, mode="thread",
                   inputs=(tmp_path, {"v0000": np.arange(192, dtype=np.float32).reshape(3, 8, 8)}))
    job.start()  # returns while the write waits on the gate
    assert job.spec["data"] == str(tmp_path / "inputs.npz") and job.poll() == []
    job.cancel()
    gate.set()
    t0, messages = time.monotonic(), []
    while not messages and time.monotonic() - t0 < 30:
        messages = job.poll()
        time.sleep(0.01)
    assert messages == [("done", str(out), True)] and not out.exists()
    assert writers and writers[0] is not threading.main_thread()
    np.testing.assert_array_equal(np.load(tmp_path / "inputs.npz")["v0000"], np.arange(192).reshape(3, 8, 8))


def test_a_training_process_killed_by_the_system_is_reported_as_such(tmp_path):
    """The system's out-of-memory killer ends a child with SIGKILL and no message of its own: the
    plugin says what most likely happened, and that the previous model is kept."""
    import time

    import napari_coral._jobs as jobs

    out = tmp_path / "m.safetensors"
    volume = np.random.default_rng(0).random((6, 32, 32), dtype=np.float32)
    job = jobs.Job("pretrain", {"out": str(out), "config": {"epochs": 10_000, "batch_size": 4,
                                                          "model": {"image_size": 32, "base_filters": 4}}},
                   mode="process", inputs=(tmp_path, {"v0000": volume})).start()
    t0 = time.monotonic()
    while job._proc is None and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    job._proc.kill()  # as the out-of-memory killer would
    messages = []
    while not messages and time.monotonic() - t0 < 60:
        messages = job.poll()
        time.sleep(0.01)
    assert len(messages) == 1 and messages[0][0] == "error", messages
    assert "killed by the system" in messages[0][1] and "out of memory" in messages[0][1]
    assert "previous model is kept" in messages[0][1] and not out.exists()


def test_a_job_child_waits_passively_unless_the_user_said_otherwise(tmp_path, monkeypatch):
    """A job's child process gets OMP_WAIT_POLICY=PASSIVE (its threads sleep, not spin, when napari or another
    job holds their cores), unless the user's environment sets it."""
    import json
    import time

    import napari_coral._jobs as jobs

    assert jobs.child_environment({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert jobs.child_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    started = []

    class Child:  # what subprocess.Popen was given, and a child that is done at once
        def __init__(self, args, **kwargs):
            started.append((args, kwargs["env"]))
            self.stdout = iter([jobs.MESSAGE_PREFIX + json.dumps(["done", str(tmp_path / "m.safetensors"), False]) + "\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", Child)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    job = jobs.Job("pretrain", {"out": str(tmp_path / "m.safetensors")}).start()
    deadline, messages = time.monotonic() + 30, []
    while not any(m[0] == "done" for m in messages) and time.monotonic() < deadline:
        messages += job.poll()
        time.sleep(0.01)
    assert messages[-1][0] == "done"
    (args, env), = started
    assert args[1:3] == ["-m", "napari_coral._jobs"] and env["OMP_WAIT_POLICY"] == "PASSIVE"
