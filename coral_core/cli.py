"""The ``coral`` command: pretrain, finetune, segment, embed, evaluate, demo, bench.

Every command takes ``--device auto|cpu|cuda|mps`` and ``--json`` (one JSON object on
stdout; progress bars go to stderr). A user mistake exits with status 2 and one line
``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from coral_core.errors import MissingStructureError, UserError, naming

# --------------------------------------------------------------------------- helpers


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error:`` line and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr and the ``callback(step, total, metrics)`` that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=quiet or None, dynamic_ncols=True)

    def callback(step: int, total_: int, metrics: dict) -> None:
        bar.total = total_
        bar.update(step - bar.n)
        if metrics:
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()}, refresh=False)

    return bar, callback


def _load_model(path: str | None, device):
    from coral_core.checkpoint import bundled_model_path, load_checkpoint

    if path is None:
        p = bundled_model_path()
        if not p.is_file():
            raise UserError("this installation has no bundled demo model; pass --model CKPT")
        return load_checkpoint(p, device)
    return load_checkpoint(path, device)


def _class_names(text: str | None, n_classes: int) -> list[str]:
    if not text:
        return ["background"] + [f"class {c}" for c in range(1, n_classes)]
    names = [n.strip() for n in text.split(",")]
    if len(names) == n_classes - 1:
        names = ["background"] + names
    if len(names) != n_classes:
        raise UserError(f"--class-names gives {len(names)} names for {n_classes} classes (0..{n_classes - 1}); name each foreground class, e.g. GM,WM")
    return names


def _rename(model, names: list[str]):
    model.config.class_names = list(names)
    return model


AUTO_IMAGE_SIZE_MAX = 256
PIXEL_SPACING_IMAGE_SIZE = 128  # coral finetune --pixel-spacing's input size when --image-size is not given
PIXEL_SPACING_HELP = ("give the model a physical scale: it sees a square of --image-size x MM millimetres of a slice "
                      "at a time (cut from a larger field of view, padded around a smaller one), so anatomy has one "
                      "size in its pixels on every scanner; fine-tuning places the square on the labels, coral segment "
                      "and the plugin cover wider slices in overlapping squares, each with the scan's own spacing "
                      "(default: each slice resized whole)")


def _check_pixel_spacing(mm: float | None) -> None:
    if mm is not None and not mm > 0:
        raise UserError(f"--pixel-spacing {mm:g}: give the model's millimetres per pixel, above 0 (1.25 for ACDC's "
                        "published preprocessing)")


def _auto_image_size(shapes, requested: int | None) -> int:
    """``--image-size``, checked; without it the volumes' largest in-plane size (``shapes`` are
    (S, H, W)) rounded up to a multiple of 16, within 64..256."""
    if requested:
        if requested % 16:
            raise UserError(f"--image-size {requested}: must be a multiple of 16")
        return requested
    largest = max(max(shape[1:]) for shape in shapes)
    return int(min(AUTO_IMAGE_SIZE_MAX, max(64, -(-largest // 16) * 16)))


def _read_inputs(inputs: list[str], phantom: int, seed: int, requested_size: int | None = None,
                 all_frames: bool = False, mm: float | None = None):
    """Volumes from files/folders and ``--phantom N`` synthetic subjects: (volumes, names, shapes,
    image size); ``all_frames``: each frame of a 4-D (cine) file is a volume (``--all-frames``). A volume
    whose model input size is already known when it is read (``--image-size``
    given, or wider than the automatic size's cap) is normalised and resampled at once
    (:func:`coral_core.data.resize_slices`), so a large cohort never holds its full-resolution
    volumes in memory together; the others, no larger than the cap, are kept as read. ``mm``: a model's
    pixel spacing (``requested_size`` then given), whose field of view is cut from each volume as it is read
    (:class:`coral_core.data.FieldOfView`); ``shapes`` stay the volumes' own."""
    from coral_core.data import FieldOfView, case_volumes, discover_volumes, resize_slices
    from coral_core.phantom import make_cohort

    if requested_size:
        _auto_image_size([], requested_size)  # a bad --image-size fails before any file is read
    volumes, names, shapes = [], [], []

    def add(volume, name: str) -> None:
        array = volume.array  # (S, H, W)
        shapes.append(tuple(array.shape))
        if mm is not None:
            with naming(volume.path or name):
                array = FieldOfView.of(array.shape[1:], volume.spacing[1:], mm, requested_size).crop(array)
        wide = max(array.shape[1:]) > AUTO_IMAGE_SIZE_MAX  # the automatic size will be the cap
        target = requested_size or (AUTO_IMAGE_SIZE_MAX if wide else None)
        volumes.append(resize_slices(array, target) if target else array)
        names.append(name)

    for case in discover_volumes(inputs, all_frames) if inputs else []:
        for name, volume in case_volumes(case):
            add(volume, name)
    for i, (img, _) in enumerate(make_cohort(phantom, seed=seed) if phantom else []):
        add(img, f"phantom{seed + i}")
    if not volumes:
        raise UserError("no input volumes; give image files or folders, or --phantom N")
    return volumes, names, shapes, _auto_image_size(shapes, requested_size)


FINETUNE_BASE_FILTERS = 16  # `coral finetune` from random init: UNetConfig.base_filters (tests check they agree)


class _Interrupted(Exception):
    """Ctrl-C stopped a run; what it had finished is saved where the message says."""


_STOP = threading.Event()


def _stop_on_ctrl_c() -> None:
    """First Ctrl-C: finish the current step, save progress, exit 130. Second: stop at once."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job: leave it so
        return

    def handler(signum, frame):
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()

    signal.signal(signal.SIGINT, handler)


def _ignore_further_ctrl_c() -> None:
    """The command is stopping on Ctrl-C: another press, while it says so and exits, would only cut that
    short with a traceback (the main thread only can set signals; the CLI runs there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_state(args, fingerprint: dict, every: int):
    """The run's resume file; without --resume an old one is replaced, not continued."""
    from coral_core.resume import ResumeState, resume_path

    state = ResumeState(resume_path(args.out), fingerprint, every)
    if args.resume and not state.exists():
        print(f"note: {state.path} not found; starting from the beginning", file=sys.stderr)
    elif not args.resume:
        state.remove()
    return state


def _init_ddp(device: str) -> tuple[int, int]:
    """Join the process group torchrun set up; returns this process's rank and the number of processes."""
    import os

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("--ddp runs under torchrun: torchrun --nproc-per-node K -m coral_core.cli pretrain --ddp ...")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _resumed_from(history) -> int:
    """The step a resumed run started after (0 for a fresh run)."""
    return history.steps[0] - 1 if history.steps else 0


def _finish(state, history, total: int) -> None:
    if history.stopped:
        raise _Interrupted(
            f"interrupted after step {history.steps[-1] if history.steps else 'none'} of {total}; progress is kept "
            f"in {state.path}; run the same command with --resume to continue"
        )


def _levers(args):
    from coral_core.levers import Levers

    return Levers(channels_last=args.channels_last, compile=args.compile,
                  data_on_device=getattr(args, "data_on_device", False), prefetch=getattr(args, "prefetch", False),
                  defer_metrics=getattr(args, "defer_metrics", False),
                  cudnn_benchmark=args.cudnn_benchmark, pad_channels=args.pad_channels,
                  fuse_batchnorm=getattr(args, "fuse_batchnorm", None), cpu_bf16=args.cpu_bf16)


def _compute(cfg) -> str:
    """The arithmetic a training config runs in on its device: "bf16" (autocast) or "float32"."""
    from coral_core.device import resolve_device
    from coral_core.training import trains_in_bf16

    return "bf16" if trains_in_bf16(resolve_device(cfg.device), cfg.amp, cfg.levers) else "float32"


def _fingerprint_config(cfg, device: str) -> dict:
    """What a resumed run must share with the first: the config, less the speed levers
    (they change results by rounding at most, so a run may resume with other ones)."""
    from coral_core.device import resolve_device
    from coral_core.model import plain_config

    config = plain_config(cfg)
    config.pop("levers")
    return config | {"device": resolve_device(device).type}


# --------------------------------------------------------------------------- commands


def cmd_pretrain(args) -> tuple[dict, str]:
    import torch

    from coral_core.checkpoint import save_checkpoint
    from coral_core.data import PretrainSlices
    from coral_core.model import UNetConfig
    from coral_core.pretrain import PretrainConfig, budget_advice, pretrain, pretraining_steps
    from coral_core.training import check_optimiser_settings

    _check_model_output(args.out, "--out", args.inputs)
    _check_pixel_spacing(args.pixel_spacing)
    check_optimiser_settings(args.lr, 0.0)  # these, before any volume is read
    if args.pixel_spacing is not None and not args.image_size:  # the field of view is the input size times it
        args.image_size = PIXEL_SPACING_IMAGE_SIZE
    rank, processes = _init_ddp(args.device) if args.ddp else (0, 1)
    if args.slice_cache:
        data, names, shapes, image_size, cache = _cached_slices(args, rank)
    else:
        volumes, names, shapes, image_size = _read_inputs(args.inputs, args.phantom, args.seed, args.image_size,
                                                          args.all_frames, args.pixel_spacing)
        data = PretrainSlices(volumes, image_size, consume=True,  # each volume freed once copied in
                              dtype=torch.float16 if args.slices_float16 else torch.float32)
        cache = None
    model_cfg = UNetConfig(base_filters=args.base_filters, image_size=image_size, embedding_dim=args.embedding_dim,
                           pixel_spacing=args.pixel_spacing)
    cfg = PretrainConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, model=model_cfg, levers=_levers(args),
    )
    fingerprint = {"command": "pretrain", "config": _fingerprint_config(cfg, args.device),
                   "inputs": [[n, int(shape[0])] for n, shape in zip(names, shapes)]}
    if args.slices_float16:  # stored inputs differ; recorded only when set, so older resume files still match
        fingerprint["slices"] = "float16"
    state = _resume_state(args, fingerprint, every=0)  # saved at every epoch's end and on Ctrl-C
    n_volumes = len(names)
    bar, callback = _progress(0, f"pretrain {args.method}", args.json or rank != 0)
    t0 = time.perf_counter()
    with bar:
        result = pretrain(cfg, data, callback, _STOP, resume=state)
    if rank != 0:  # rank 0 alone reports and writes
        return None, ""
    _finish(state, result.history, bar.total)
    seconds = time.perf_counter() - t0
    training = {
        "stage": "pretrain", "method": args.method, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "volumes": n_volumes, "processes": processes,
        "slices": "float16" if args.slices_float16 else "float32", "compute": _compute(cfg),
        "final_loss": result.history.last("loss"),
    }
    save_checkpoint(args.out, result.model, training)
    state.remove()
    out = {"checkpoint": str(args.out), "method": args.method, "volumes": n_volumes, "processes": processes,
           "steps": len(result.history.steps), "resumed_from": _resumed_from(result.history),
           "final_loss": result.history.last("loss"), "seconds": round(seconds, 1), "slice_cache": cache}
    from_cache = f" (slices {cache} {args.slice_cache})" if cache else ""
    steps = _count_of(pretraining_steps(len(data), args.batch_size, args.epochs), "step")  # a continued run's too
    advice = budget_advice(len(data), args.batch_size, args.epochs)
    return out, (f"pretrained {args.method} on {_count_of(n_volumes, 'volume')}, {steps} in {seconds:.0f} s{from_cache}; "
                 f"saved {args.out}" + (f"\n{steps} is a quick look: {advice}" if advice else ""))


def _cached_slices(args, rank: int):
    """The slice set of ``--slice-cache``: mapped from the file when it was made from these
    inputs and settings, else read, prepared into the file, and mapped. Under ``--ddp``
    process 0 writes it while the others wait, then every process maps the same file.
    Returns (slices, names, shapes, image size, "reused" or "written")."""
    import torch

    from coral_core import slicecache
    from coral_core.data import discover_volumes

    path = slicecache.check_cache_path(args.slice_cache)
    images = [case.image for case in discover_volumes(args.inputs, args.all_frames)] if args.inputs else []
    key = slicecache.cache_key(images, args.phantom, args.seed, args.image_size,
                               "float16" if args.slices_float16 else "float32")
    if args.all_frames:  # recorded only when on, so caches written before the option stay valid
        key["all_frames"] = True
    if args.pixel_spacing is not None:  # likewise
        key["pixel_spacing"] = args.pixel_spacing
    found, how = (slicecache.open_cache(path, key), "reused") if rank == 0 else (None, None)
    if rank == 0 and found is None:
        volumes, names, shapes, image_size = _read_inputs(args.inputs, args.phantom, args.seed, args.image_size,
                                                          args.all_frames, args.pixel_spacing)
        slicecache.write_cache(path, key, volumes, image_size, names, shapes)
        how = "written"
    if args.ddp:
        torch.distributed.barrier()  # the file is complete before any other process maps it
    if found is None:
        found = slicecache.open_cache(path, key)
    if found is None:
        raise UserError(f"--slice-cache {path}: the slices written could not be read back; delete the file and run again")
    data, description = found
    shapes = [tuple(shape) for shape in description["shapes"]]
    return data, description["names"], shapes, description["image_size"], how


def _annotated_pairs(image_path: str, labels_path: str, slices_text: str | None, size: int | None = None,
                     label_values: list[int] | None = None, mm: float | None = None,
                     structures: list[str] | None = None) -> list[tuple[str, str, tuple]]:
    """The annotated scans of one image and the label volume drawn on it, checked, each as (name, the
    labels' name, pair) with the pair as :func:`_annotated_pair` gives it: a 3-D image is one scan named by its path; a 4-D
    (cine) image with 4-D labels (or a DICOM SEG or RT structure set drawn on its frames) gives one scan per frame
    that holds labels, named "IMAGE frame T", as
    the plugin's Fine-tune panel trains on a cine layer. ``mm``: the model's pixel spacing, whose field of
    view (:class:`coral_core.data.FieldOfView`, ``size`` pixels at ``mm``), placed on the scan's labels, is
    cut from each scan first; the pair then carries how many labelled voxels lay outside it. ``structures``: the
    classes (SEG segments, RT structure set ROIs) of these names only, as classes 1, 2, ..."""
    from coral_core.data import FieldOfView
    from coral_core.volume import (Volume, frame_count, is_dicom_labels, load_frames, load_labels_like, load_volume,
                                   pick_classes)

    def pair(image, labels, names, slices):
        image_array, labels_array, outside = image.array, labels.array, 0
        if mm is not None:
            with naming(names[0]):
                fov = FieldOfView.of(image.shape[1:], image.spacing[1:], mm, size)
            if labels.shape == image.shape:  # another shape is refused by _annotated_pair, naming both
                fov = fov.around(labels_array)  # where it holds the most labels
                outside = fov.outside(labels_array)
                image_array, labels_array = fov.crop(image_array), fov.crop(labels_array, 0)
        return (*_annotated_pair(image_array, labels_array, *names, slices, size, label_values), outside)

    series = frame_count(image_path)
    if series == 1:
        image = load_volume(image_path)
        labels = load_labels_like(labels_path, image, structures)  # a DICOM SEG: placed on the image's grid
        return [(image_path, labels_path, pair(image, labels, (image_path, labels_path), slices_text))]
    if slices_text:
        raise UserError(f"{image_path}: --slices names slices of one volume, and this is a series of {series} frames; "
                        "leave --slices out to train on the slices that hold labels in each frame")
    images = load_frames(image_path)
    if is_dicom_labels(labels_path):  # a SEG or structure set of the cine: each frame's labels on that frame
        labels = dicom_labels_frames(labels_path, images, structures)
    else:
        if frame_count(labels_path) != series:
            raise UserError(f"{labels_path}: holds {_count_of(frame_count(labels_path), 'frame')} but {image_path} is "
                            f"a series of {series} frames; give the 4-D labels drawn on this series")
        labels = load_frames(labels_path)
        if structures is not None:
            labels = [Volume(pick_classes(lab.array, labels_path, structures), lab.affine, lab.path) for lab in labels]
    out = []
    for t, (image, lab) in enumerate(zip(images, labels)):
        if lab.array.any():  # the frames nobody painted are not training data
            names = f"{image_path} frame {t}", f"{labels_path} frame {t}"
            out.append((*names, pair(image, lab, names, None)))
        images[t] = labels[t] = None  # only the prepared pairs stay
    if not out:
        raise UserError(f"{labels_path}: no frame holds any label; paint some slices of a frame")
    return out


def _leave_out(incomplete: list[tuple], any_left: bool, what: str) -> None:
    """Dataset cases left out for want of a structure of --structures ((file, its MissingStructureError)): one
    warning line each, ending in ``what``; when none is left, one error, the first case's sentence."""
    if incomplete and not any_left:
        raise UserError(f"{incomplete[0][1]}, nor does any other case; give names that every case holds "
                        "(NAME|OTHER for a structure named two ways)")
    for _, exc in incomplete:
        warnings.warn(f"{exc}; {what}")


def _structures_option(args) -> list[str] | None:
    """--structures NAME,NAME,... as a list (None without it), checked against --label-values before any file is
    read."""
    text = getattr(args, "structures", None)
    if text is None:
        return None
    from coral_core.dicomlabels import alternatives

    names = [name.strip() for name in text.split(",") if alternatives(name)]
    if not names:
        raise UserError("--structures: give the names of the structures to take, separated by commas, e.g. Heart,Lung_L")
    each = [one.casefold() for name in names for one in alternatives(name)]
    if len(set(each)) != len(each):
        raise UserError(f"--structures {text}: a name is listed twice; give each structure once")
    if getattr(args, "label_values", None):
        raise UserError("give --structures (by name) or --label-values (by value), not both")
    return names


def _as_spelled(structures: list[str], path) -> list[str]:
    """Structure names as the label file ``path`` spells them (they are matched without regard to case); an entry
    of alternatives (``Heart|Cor``) is named by its first, as given, whichever a file holds."""
    from coral_core.dicomlabels import alternatives
    from coral_core.volume import read_class_names

    spelled = {name.strip().casefold(): name for name in reversed((read_class_names(path) or [])[1:])}
    return [spelled.get(name.casefold(), name) if len(alternatives(name)) == 1 else alternatives(name)[0]
            for name in structures]


def _annotated_pair(array, raw, image_name: str, labels_name: str, slices_text: str | None,
                    size: int | None = None, label_values: list[int] | None = None):
    """One image and the label volume drawn on it, checked: (image, labels, annotated slices, the
    image's shape, its largest label). Image and labels are the (S, H, W) arrays as read (labels as
    uint8), or the pair prepared at the model's input size (:func:`coral_core.data.prepare_labelled`)
    when that is known as it is read: ``size`` given (a checkpoint's, or ``--image-size``), or the image
    wider than the automatic size's cap. So many large scans never sit in memory together at full
    resolution; the others, no larger than the cap, are kept as read. ``label_values``: the values that
    stand for classes 1, 2, ... in the label file (:func:`coral_core.data.label_map`)."""
    from coral_core.data import label_map, parse_slices, prepare_labelled
    from coral_core.finetune import annotated_from_labels

    if raw.shape != array.shape:
        raise UserError(f"{labels_name}: labels of shape {raw.shape} do not match {image_name} of shape {array.shape}; "
                        "give the labels drawn on this image")
    lab = label_map(raw, labels_name, label_values)  # uint8, up to 255 classes: an eighth of int64's memory
    del raw
    slices = parse_slices(slices_text, array.shape[0], image_name) if slices_text else annotated_from_labels(lab)
    if not slices:
        raise UserError(f"{labels_name}: no slice holds any label; paint some slices or pass --slices")
    shape, top = tuple(array.shape), int(lab.max())
    if size is None and max(shape[1:]) > AUTO_IMAGE_SIZE_MAX:  # the automatic size will be the cap
        size = AUTO_IMAGE_SIZE_MAX
    if size:
        array, lab = prepare_labelled(array, lab, size)
    return array, lab, slices, shape, top


def _finetune_inputs(args) -> tuple[list[str], list[str], list[str]]:
    """The images and label files `coral finetune` trains on: IMAGE... with --labels one each, or,
    without --labels, the labelled cases of dataset folders (:func:`coral_core.data.discover_volumes`);
    and the images of those folders that were skipped for want of a label file."""
    from coral_core.data import discover_volumes

    if args.labels is not None:
        if len(args.labels) != len(args.image):
            raise UserError(f"--labels names {len(args.labels)} file(s) for {len(args.image)} image(s); give one label "
                            "volume per image, in the same order")
        images, label_files, skipped = list(map(str, args.image)), list(map(str, args.labels)), []
    else:
        if args.slices:
            raise UserError("--slices needs --labels: name each image and its labels, in the same order as --slices")
        found = discover_volumes(args.image)
        cases = [case for case in found if case.label is not None]
        skipped = [str(case.image) for case in found if case.label is None]
        if not cases:
            raise UserError(f"{' '.join(map(str, args.image))}: no image there comes with a label file; give --labels "
                            "with one label volume per image, or a dataset folder that holds label files (ACDC; "
                            "imagesTr and labelsTr; files such as ct_1001_image and ct_1001_label side by side)")
        images, label_files = [str(case.image) for case in cases], [str(case.label) for case in cases]
    if args.slices and len(args.slices) != len(images):
        raise UserError(f"--slices is given {len(args.slices)} time(s) for {len(images)} image(s); give it once per "
                        "image, in the same order, or leave it out to use the slices that hold labels")
    return images, label_files, skipped


def cmd_finetune(args) -> tuple[dict, str]:
    import torch

    from coral_core.checkpoint import load_checkpoint, pretrained_only, save_checkpoint
    from coral_core.data import parse_label_values
    from coral_core.finetune import FinetuneConfig, finetune
    from coral_core.model import UNetConfig, build_model, resize_head
    from coral_core.training import check_optimiser_settings
    from coral_core.volume import read_class_names

    # (--init is not among the inputs guarded: a model fine-tuned further may replace the one it started from)
    _check_model_output(args.out, "--out", [*args.image, *(args.labels or []), *(args.unlabelled or [])])
    check_optimiser_settings(args.lr, 0.0)  # these, before any volume is read
    if args.classes is not None and args.classes > 256:
        raise UserError(f"--classes {args.classes}: label maps of up to 255 classes and background are supported")
    if not 0 <= args.embedding_weight < math.inf:  # NaN too
        raise UserError(f"--embedding-weight {args.embedding_weight:g}: give a finite weight of 0 (off) or more, e.g. 0.1")
    if args.unlabelled and args.embedding_weight <= 0:
        raise UserError("--unlabelled trains the embedding loss on those images; give --embedding-weight above 0 "
                        "(default 0.1), or leave --unlabelled out")
    label_values = parse_label_values(args.label_values) if args.label_values else None  # before any file is read
    structures = _structures_option(args)
    if label_values and args.classes is not None and args.classes != len(label_values) + 1:
        raise UserError(f"--classes {args.classes} but --label-values lists {len(label_values)} foreground classes "
                        f"({len(label_values) + 1} with background); leave --classes out")
    if structures and args.classes is not None and args.classes != len(structures) + 1:
        raise UserError(f"--classes {args.classes} but --structures names {len(structures)} foreground classes "
                        f"({len(structures) + 1} with background); leave --classes out")
    images, label_files, skipped = _finetune_inputs(args)
    if args.init:  # read first: its input size lets every scan be prepared at that size as it is read
        model, meta = load_checkpoint(args.init)
        size = model.config.image_size
        for option, given, own in (("--image-size", args.image_size, size),
                                   ("--base-filters", args.base_filters, model.config.base_filters)):
            if given is not None and given != own:
                raise UserError(f"{option} {given}: the --init model {args.init} has {own}; leave {option} out to "
                                "fine-tune it as it is, or leave --init out to start from random init")
        own_mm = model.config.pixel_spacing
        if args.pixel_spacing is not None and own_mm is not None and args.pixel_spacing != own_mm:
            raise UserError(f"--pixel-spacing {args.pixel_spacing:g}: the --init model {args.init} sees {own_mm:g} mm per "
                            "pixel; leave --pixel-spacing out to fine-tune it as it is")
        mm = own_mm if args.pixel_spacing is None else args.pixel_spacing
    else:
        mm = args.pixel_spacing
        if args.image_size:  # checked before any file is read
            size = _auto_image_size([], args.image_size)
        else:  # at a pixel spacing the field of view is the input size times it: not the scans' own
            size = PIXEL_SPACING_IMAGE_SIZE if mm is not None else None
    _check_pixel_spacing(mm)
    named, incomplete = [], []
    for i, (image, labels) in enumerate(zip(images, label_files)):
        try:
            named += _annotated_pairs(image, labels, args.slices[i] if args.slices else None, size, label_values,
                                      mm, structures)
        except MissingStructureError as exc:
            if args.labels is not None:  # a file the user named: it must hold them
                raise
            incomplete.append((labels, exc))  # a dataset's case: left out, as a case without labels is
    _leave_out(incomplete, bool(named), "the case is left out")
    incomplete = [labels for labels, _ in incomplete]
    if incomplete:
        images = [image for image, labels in zip(images, label_files) if labels not in incomplete]
        label_files = [labels for labels in label_files if labels not in incomplete]
    scans = [name for name, _, _ in named]  # a cine file gives one scan per annotated frame
    scan_labels = [name for _, name, _ in named]
    pairs = [pair for *_, pair in named]
    del named
    n = len(scans)
    tops = [top for *_, top, _ in pairs]
    outside = sum(out for *_, out in pairs)  # labelled voxels beyond a physical scale's field of view
    top = max(tops)
    if label_values or structures:
        n_classes = len(label_values or structures) + 1
    else:
        n_classes = top + 1 if args.classes is None else args.classes
    if n_classes < 2:
        raise UserError(f"{' and '.join(label_files)}: only background is labelled; at least one foreground class is needed")
    if top >= n_classes:
        raise UserError(f"{scan_labels[tops.index(top)]}: holds label {top} but "
                        f"--classes is {n_classes}; raise --classes")
    names = _class_names(args.class_names or (",".join(_as_spelled(structures, label_files[0])) if structures else None),
                         n_classes)
    stored = None
    if not args.class_names and not structures:  # the names the label files carry (coral segment's, napari-coral's writer's), if they fit
        stored = next((n for n in map(read_class_names, dict.fromkeys(label_files)) if n and len(n) == n_classes), None)
        names = stored or names
    # A new head (or a random-init model) draws its weights from torch's global generator, which each process
    # seeds at random: seeded here, as pretrain() seeds before building its model, --seed repeats the run.
    torch.manual_seed(args.seed)
    if args.init:
        init = str(args.init)
        # A pretrained encoder has no trained head: give it one for these labels. A fine-tuned
        # model keeps its head when the classes match, under the names given or read (if any).
        fresh_head = pretrained_only(meta) or model.config.n_classes != n_classes
        if fresh_head:
            model = resize_head(model, n_classes, names)
        elif args.class_names or structures or stored:  # named classes, as many as it has: its head, their names
            model = _rename(model, names)
        if mm != model.config.pixel_spacing:  # a model without a physical scale given one
            from dataclasses import replace

            model.config = replace(model.config, pixel_spacing=mm)
    else:
        model = build_model(UNetConfig(
            n_classes=n_classes, class_names=names, base_filters=args.base_filters or FINETUNE_BASE_FILTERS,
            image_size=size or _auto_image_size([shape for *_, shape, _, _ in pairs], args.image_size), pixel_spacing=mm,
        ))
        init = "random"
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                         embedding_weight=args.embedding_weight, embedding_every=args.embedding_every,
                         balance_classes=args.balance_classes, levers=_levers(args))
    if args.zoom:
        from dataclasses import replace

        cfg.augment = replace(cfg.augment, scale=_float_range(args.zoom, "--zoom", "0.7,1.4"))
    slices = [pair_slices for _, _, pair_slices, *_ in pairs]
    unlabelled = None
    if args.unlabelled:
        unlabelled = _read_inputs(args.unlabelled, 0, args.seed, model.config.image_size, mm=mm)[0]  # at its size
    # one image keeps the fingerprint it always had, so a run stopped by an earlier version continues
    paths = {"image": [str(Path(p).resolve()) for p in images], "labels": [str(Path(p).resolve()) for p in label_files],
             "slices": slices}
    fingerprint = {"command": "finetune", "config": _fingerprint_config(cfg, args.device),
                   **({k: v[0] for k, v in paths.items()} if n == 1 else paths),
                   "init": str(Path(init).resolve()) if args.init else init,
                   "classes": n_classes, "model": model.config.to_dict()}
    if args.unlabelled:  # recorded only when given, so earlier resume files still match
        fingerprint["unlabelled"] = [str(Path(p).resolve()) for p in args.unlabelled]
    if label_values:
        fingerprint["label_values"] = label_values
    if structures:
        fingerprint["structures"] = structures
    if scans != images:  # a cine file's annotated frames
        fingerprint["scans"] = scans
    state = _resume_state(args, fingerprint, every=50)
    bar, callback = _progress(cfg.steps, "fine-tune", args.json)
    t0 = time.perf_counter()
    with bar:
        result = finetune(cfg, model, [image for image, *_ in pairs], [lab for _, lab, *_ in pairs], slices,
                          callback, _STOP, resume=state, unlabelled=unlabelled)
    _finish(state, result.history, cfg.steps)
    seconds = time.perf_counter() - t0
    # one image: "image" and "slices" as before; several: "images" and one slice list per image
    where = {"image": scans[0], "slices": slices[0]} if n == 1 else {"images": scans, "slices": slices}
    training = {"stage": "finetune", "init": init, **where, "steps": args.steps,
                "embedding_weight": args.embedding_weight if model.has_direction or unlabelled else 0.0,
                "embedding_every": args.embedding_every, "balance_classes": args.balance_classes,
                "zoom": list(cfg.augment.scale), "shift": cfg.augment.translate, "compute": _compute(cfg),
                "lr": args.lr, "seed": args.seed,
                "final_loss": result.history.last("loss")}
    if unlabelled:
        training["unlabelled"] = list(map(str, args.unlabelled))
    if label_values:
        training["label_values"] = label_values
    if structures:
        training["structures"] = structures
    save_checkpoint(args.out, result.model, training)
    state.remove()
    out = {"checkpoint": str(args.out), "init": init, "slices": where["slices"], "steps": len(result.history.steps),
           "resumed_from": _resumed_from(result.history),
           "final_loss": result.history.last("loss"), "seconds": round(seconds, 1)}
    out.update({"images": scans} if n > 1 else {"image": scans[0]})
    if unlabelled:
        out["unlabelled"] = len(unlabelled)
    if skipped:
        out["skipped_without_labels"] = skipped
    if incomplete:
        out["skipped_without_structures"] = incomplete
    if mm is not None:
        out["pixel_spacing"] = mm
        out["labels_outside_field_of_view"] = outside
    annotated = "; ".join(f"slices {s} of {scan}" for s, scan in zip(slices, scans))
    named = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    note = f" ({_count_of(len(skipped), 'image')} without a label file skipped: {named})" if skipped else ""
    if incomplete:
        note += f" ({_count_of(len(incomplete), 'case')} without every structure left out)"
    if outside:
        note += (f" ({_count_of(outside, 'labelled voxel')} outside the {model.config.image_size * mm:g} mm square "
                 "the model sees at its pixel spacing, not trained on)")
    return out, f"fine-tuned on {annotated}{note} in {seconds:.0f} s; saved {args.out}"


def _segment_targets(args) -> list[tuple[Path, Path]]:
    """(image, labels file) of each volume `coral segment` is given: IMAGE with --out, or with --out-dir the
    volumes of every INPUT (files, DICOM folders, dataset folders), each written there as NAME_labels."""
    from coral_core.data import _stem, discover_volumes, output_name
    from coral_core.dicomlabels import check_dicom_seg_source, is_dicom_seg_name
    from coral_core.fileio import check_not_an_input, check_output_path, same_file
    from coral_core.volume import VOLUME_SUFFIXES, is_volume_path

    if args.out is not None and args.out_dir is not None:
        raise UserError("give --out LABELS or --out-dir DIR, not both: --out writes one image's labels, --out-dir "
                        "every image's")
    if args.out is None and args.out_dir is None:
        raise UserError("give --out LABELS for one image, or --out-dir DIR for several images or folders")
    if args.dicom_seg and args.out is not None:
        raise UserError("--dicom-seg goes with --out-dir; with --out, end the file's name with .dcm for a DICOM SEG")
    if args.dicom_seg and args.rt_struct:
        raise UserError("give --dicom-seg or --rt-struct, not both: DICOM labels are written as one or the other")
    if args.rt_struct and args.out is not None and not is_dicom_seg_name(args.out):
        raise UserError(f"{args.out}: --rt-struct writes a DICOM RT structure set; end the output's name with .dcm")
    what = "DICOM RT structure set" if args.rt_struct else "DICOM SEG"
    if args.out is not None:
        if len(args.images) != 1:
            raise UserError(f"--out writes one label volume but {len(args.images)} inputs were given; use --out-dir DIR")
        if Path(args.images[0]).is_dir() and not is_volume_path(args.images[0]):
            raise UserError(f"{args.images[0]}: a folder of volumes, not one volume; use --out-dir DIR instead of --out")
        out = check_output_path(args.out)
        check_not_an_input(out, [args.images[0], args.model])
        if is_dicom_seg_name(out):  # DICOM labels refer to the DICOM images they label: only for a DICOM input
            check_dicom_seg_source(args.images[0], out, what)
        return [(Path(args.images[0]), out)]
    out_dir = Path(args.out_dir)
    targets: dict[Path, Path] = {}
    cases = discover_volumes(args.images)
    for case in cases:
        stem = _stem(case.image)
        suffix = case.image.name[len(stem):].lower()
        # one file each, in the image's format (a cine's labels: one 4-D file); DICOM (a series' folder, a
        # multi-frame file) -> NIfTI
        suffix = {".mhd": ".mha", ".nhdr": ".nrrd"}.get(suffix, suffix if suffix in VOLUME_SUFFIXES else ".nii.gz")
        if (args.dicom_seg or args.rt_struct) and suffix == ".nii.gz" and _dicom_source(case.image):
            suffix = ".dcm"  # a DICOM SEG (or RT structure set) on the series' images (a cine's: every frame's)
        out = out_dir / f"{output_name(case)}_labels{suffix}"
        if out in targets:
            raise UserError(f"{targets[out]} and {case.image} would both be written to {out}; segment them in separate runs")
        targets[out] = case.image
    for out in targets:  # a case's own labels, named as segment names its output (CASE_labels), are the user's
        check_not_an_input(out, [args.model, *(c.image for c in cases)])
        for case in cases:
            if same_file(out, case.label):
                raise UserError(f"{out}: holds the labels of {case.image}, which segmenting into {out_dir} would "
                                "replace; choose another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc}); choose another --out-dir") from None
    beside = [out for out, image in targets.items()
              if image.is_file() and out.parent.resolve() == image.parent.resolve()]
    if beside:  # named as a dataset folder names an image's labels: read back as ground truth next time
        whose = "its image" if len(beside) == 1 else "their images"
        print(f"warning: {_count_of(len(beside), 'label file')} will lie beside {whose} in {out_dir} ({beside[0].name}"
              f"{', ...' if len(beside) > 1 else ''}), where coral finetune, evaluate and bench lowlabel --data read "
              "NAME_labels files as an image's ground truth; keep predictions in a folder of their own",
              file=sys.stderr)
    return [(image, check_output_path(out)) for out, image in targets.items()]


def dicom_labels_frames(path, frames: list, structures: list[str] | None = None) -> list:
    """A DICOM SEG or RT structure set on the voxel grid of an image's frames, one volume per frame (a cine's each
    frame placed by the images it names: :func:`coral_core.volume.load_labels_like`)."""
    import numpy as np

    from coral_core.volume import Volume, load_labels_like

    if len(frames) == 1:
        return [load_labels_like(path, frames[0], structures)]
    like = Volume(np.broadcast_to(np.uint8(0), (len(frames), *frames[0].shape)), frames[0].affine, frames[0].path)
    return [Volume(array, frames[0].affine, Path(path)) for array in load_labels_like(path, like, structures).array]


def _dicom_source(path) -> bool:
    """Whether a volume was read from DICOM (a series folder or a multi-frame file): a DICOM SEG can refer to it."""
    from coral_core.dicomlabels import check_dicom_seg_source

    try:
        check_dicom_seg_source(path, "")
    except UserError:
        return False
    return True


def cmd_segment(args) -> tuple[dict, str]:
    import numpy as np

    from coral_core.checkpoint import pretrained_only
    from coral_core.data import tiling_note, windows_per_slice
    from coral_core.device import resolve_device
    from coral_core.infer import iter_segment_series, keep_largest_components
    from coral_core.dicomlabels import is_dicom_seg_name, save_dicom_seg, save_rt_structure_set
    from coral_core.volume import load_frames, save_like

    targets = _segment_targets(args)
    device = resolve_device(args.device)
    model, meta = _load_model(args.model, device)
    if pretrained_only(meta):  # before any image is read
        raise UserError(f"{args.model}: a pretrained model whose segmentation head is untrained; fine-tune it on a few "
                        f"annotated slices first (coral finetune IMAGE --labels LABELS --init {args.model} --out CKPT)")
    results, done, note = [], 0, ""
    t_all = time.perf_counter()
    try:
        for image_path, out_path in targets:
            frames = load_frames(image_path)  # a 4-D cine series: every frame, written as one 4-D file
            image, n = frames[0], frames[0].shape[0]
            bar, _ = _progress(n * len(frames), "segment" if len(targets) == 1 else image_path.name, args.json)
            t0 = time.perf_counter()
            with bar, naming(image_path):
                for slices_done, labels in iter_segment_series(model, [f.array for f in frames], device,
                                                               args.batch_size, _levers(args), image.spacing):
                    bar.update(slices_done - bar.n)
            labels = labels[0] if len(frames) == 1 else labels
            del frames
            removed = None
            if args.largest_component:
                labels, removed = keep_largest_components(labels)
            seconds = time.perf_counter() - t0
            if is_dicom_seg_name(out_path):  # DICOM labels on the input series' images, named by class
                save = save_rt_structure_set if args.rt_struct else save_dicom_seg
                save(out_path, labels, image, model.config.class_names)
            else:
                save_like(out_path, labels, image, model.config.class_names)  # names in the header, for evaluate, napari
            done += 1
            counts = np.bincount(labels.ravel(), minlength=model.config.n_classes)
            results.append({"image": str(image_path), "labels": str(out_path), "shape": list(labels.shape),
                            "voxels": {name: int(counts[c]) for c, name in enumerate(model.config.class_names)},
                            "seconds": round(seconds, 2)})
            if removed is not None:  # voxels of smaller pieces, made background
                results[-1]["removed_voxels"] = removed
            if model.config.pixel_spacing is not None:  # a physical scale: in how many windows of it
                results[-1]["windows_per_slice"] = windows_per_slice(model.config, image.shape, image.spacing)
                note = tiling_note(model.config, image.shape, image.spacing)  # one image's summary says it
    except KeyboardInterrupt:
        if args.out_dir is None or not done:
            raise
        raise _Interrupted(f"interrupted; {done} of {len(targets)} volumes are segmented in {args.out_dir}, each file "
                           "whole, the others not") from None
    except UserError as exc:
        if not done:
            raise
        raise UserError(f"{exc}; stopped after segmenting the {_count_of(done, 'volume')} before it into "
                        f"{args.out_dir}") from None
    if args.out is not None:  # one image: the format `coral segment IMAGE --out LABELS` always had
        one = results[0]
        out = {"labels": one["labels"], "shape": one["shape"], "voxels": one["voxels"], "seconds": one["seconds"],
               "device": str(device)}
        if args.largest_component:
            out["removed_voxels"] = one["removed_voxels"]
            note = (f"{note}; " if note else "") + f"{_count_of(one['removed_voxels'], 'voxel')} of smaller pieces made background"
        if model.config.pixel_spacing is not None:  # the model's physical scale (docs/engine.md)
            out["pixel_spacing"] = model.config.pixel_spacing
            out["windows_per_slice"] = one["windows_per_slice"]
        what = (_count_of(one["shape"][0], "slice") if len(one["shape"]) == 3 else
                f"{_count_of(one['shape'][0], 'frame')} of {_count_of(one['shape'][1], 'slice')}")
        note = f"; {note}" if note else ""
        return out, (f"segmented {args.images[0]} ({what}) on {device} in {one['seconds']:.1f} s; wrote "
                     f"{one['labels']}{note}")
    seconds = time.perf_counter() - t_all
    slices = sum(int(np.prod(r["shape"][:-2])) for r in results)  # a cine series: frames x slices
    out = {"volumes": results, "out_dir": str(Path(args.out_dir)), "seconds": round(seconds, 2), "device": str(device)}
    note = ""
    if model.config.pixel_spacing is not None:
        out["pixel_spacing"] = model.config.pixel_spacing
        wider = [r for r in results if r["windows_per_slice"] > 1]
        side = model.config.image_size * model.config.pixel_spacing
        if wider:
            note = (f"; {len(wider)} of them wider than the {side:.4g} mm square the model sees, their slices "
                    "segmented in overlapping windows of it")
    if args.largest_component:
        note += f"; {_count_of(sum(r['removed_voxels'] for r in results), 'voxel')} of smaller pieces made background"
    return out, (f"segmented {_count_of(len(results), 'volume')} ({_count_of(slices, 'slice')}) on {device} in "
                 f"{seconds:.1f} s; wrote {Path(args.out_dir) / 'NAME_labels'} for each{note}")


def cmd_embed(args) -> tuple[dict, str]:
    from coral_core.data import case_volumes, discover_volumes
    from coral_core.device import resolve_device
    from coral_core.embedding import project_trajectories, write_trajectory_table
    from coral_core.fileio import check_not_an_input, check_output_path
    from coral_core.infer import embed_volume
    from coral_core.phantom import make_phantom
    from coral_core.plotting import save_trajectory_png
    from coral_core.volume import load_volume

    check_output_path(args.out)
    check_not_an_input(args.out, [*args.images, args.model])
    if args.plot:
        _check_png(args.plot)
        check_output_path(args.plot)
        check_not_an_input(args.plot, [*args.images, args.model])
    device = resolve_device(args.device)
    model, _ = _load_model(args.model, device)
    if not args.images and not args.phantom:
        raise UserError("no input volumes; give image files or folders, or --phantom N")
    features, names = [], []
    for case in discover_volumes(args.images, args.all_frames) if args.images else []:  # files, DICOM series, datasets
        if case.frames:  # --all-frames: each frame a volume, named SUBJECT_t00, SUBJECT_t01, ...
            for name, frame in case_volumes(case):
                with naming(name):
                    features.append(embed_volume(model, frame.array, device, spacing=frame.spacing))
                names.append(name)
            continue
        volume = load_volume(case.image)  # one volume in memory at a time
        with naming(case.image):
            features.append(embed_volume(model, volume.array, device, spacing=volume.spacing))
        names.append(volume.name)
        del volume
    for i in range(args.phantom):  # made one at a time, as read files are
        volume, _ = make_phantom(args.seed + i)
        features.append(embed_volume(model, volume.array, device, spacing=volume.spacing))
        names.append(f"phantom{args.seed + i}")
    direction = model.canonical_direction.cpu().numpy() if model.has_direction else None
    trajectories, _, score = project_trajectories(features, names, direction)
    write_trajectory_table(args.out, trajectories)
    if args.plot:
        save_trajectory_png(args.plot, trajectories, score, direction is not None)
    out = {"table": str(args.out), "plot": args.plot, "ordinal_consistency": score,
           "volumes": {t.name: t.score for t in trajectories}, "axis": "coral" if direction is not None else "pca"}
    consistency = (f"ordinal consistency {score:.3f}" if math.isfinite(score)
                   else "no ordinal consistency (fewer than two slices, or all alike along the axis)")
    text = f"embedded {_count_of(len(features), 'volume')}; {consistency}; wrote {args.out}"
    return out, text + (f" and {args.plot}" if args.plot else "")


def _score_pair(pred, truth, class_names: str | None, label_values: list[int] | None, grid=None,
                structures: list[str] | None = None) -> dict:
    """`coral evaluate PRED TRUTH` for two files: Dice and HD95 per class and their means (a cine series: the means
    over its frames, each frame's in "frames"). ``grid``: the image whose voxel grid two DICOM label files (SEG, RT
    structure set) are placed on, which hold none of their own. ``structures``: TRUTH's structures of these names
    as classes 1, 2, ..., and PRED's too when it names its classes (else its labels are taken as those classes)."""
    import numpy as np

    from coral_core.data import label_map
    from coral_core.metrics import evaluate_segmentation
    from coral_core.volume import Volume, is_dicom_labels, load_frames, pick_classes, read_class_names

    def frames_of(path, like=None, picked=False) -> list:
        """A file's labels (a DICOM SEG or structure set on the grid of ``like``, an image's frames), the structures
        picked where asked."""
        if is_dicom_labels(path):
            if len(like) > 1 and not _dicom_source(like[0].path):
                raise UserError(f"{path}: DICOM labels of a cine series name the DICOM image of each frame, which "
                                f"{like[0].path} is not; give the series they were drawn on with --image IMAGE")
            return dicom_labels_frames(path, like, structures)
        frames = load_frames(path)
        if structures and (picked or read_class_names(path)):
            frames = [Volume(pick_classes(f.array, path, structures), f.affine, f.path) for f in frames]
        return frames

    # a cine series (4-D files, as coral segment writes one) is scored frame by frame; a DICOM SEG or RT structure
    # set is placed on the grid of the other file
    def grid_of(other: list) -> list:
        """The frames DICOM labels are placed on: the other file's, or for a cine (whose DICOM images alone say
        which image is which phase) and where the other file is DICOM labels too, ``grid``'s."""
        return load_frames(grid) if grid is not None and (not other or len(other) > 1) else other

    if is_dicom_labels(pred) and is_dicom_labels(truth) and grid is not None:
        image = grid_of([])
        preds, truths = frames_of(pred, image), frames_of(truth, image)
    elif is_dicom_labels(pred) and is_dicom_labels(truth):
        raise UserError(f"{pred}: PRED and TRUTH are both DICOM SEG or RT structure set files, which hold no voxel grid "
                        "of their own; give the image they were drawn on with --image IMAGE")
    elif is_dicom_labels(truth):
        preds = frames_of(pred)
        truths = frames_of(truth, grid_of(preds))
    elif is_dicom_labels(pred):
        truths = frames_of(truth, picked=True)
        preds = frames_of(pred, grid_of(truths))
    else:
        preds, truths = frames_of(pred), frames_of(truth, picked=True)
    if len(preds) != len(truths) or preds[0].shape != truths[0].shape:
        shapes = [f"{len(v)} frames of {v[0].shape}" if len(v) > 1 else str(v[0].shape) for v in (preds, truths)]
        raise UserError(f"{pred}: shape {shapes[0]} differs from {truth} shape {shapes[1]}; compare a "
                        "segmentation with the labels of the same image")
    # the names the files carry (coral segment writes the model's), read once, when no option names the classes
    named = None if structures or class_names else [read_class_names(pred), read_class_names(truth)]
    if named and not label_values:  # compared by number: say so when the names disagree
        if all(named) and [n.casefold() for n in named[0][1:]] != [n.casefold() for n in named[1][1:]]:
            import warnings

            # without the paths: a folder of cases named alike says it once
            warnings.warn(f"PRED names its classes {', '.join(named[0][1:])} and TRUTH {', '.join(named[1][1:])}; they "
                          "are compared by number (1 with 1, ...); give --structures NAME,... to compare them by name",
                          stacklevel=2)
    ps = [label_map(v.array, pred).astype(np.int64) for v in preds]
    ts = [label_map(v.array, truth, label_values).astype(np.int64) for v in truths]
    top_p, top_t = max(int(a.max()) for a in ps), max(int(a.max()) for a in ts)  # over every frame
    n_classes = max(max(top_p, top_t) + 1, 2)
    names = None
    option = "--class-names" if class_names else "--structures"
    class_names = class_names or (",".join(_as_spelled(structures, truth)) if structures else None)
    if class_names:
        given = [n.strip() for n in class_names.split(",")]
        foreground = given[1:] if given[0].lower() == "background" else given
        if n_classes > len(foreground) + 1:
            path = pred if top_p >= top_t else truth
            raise UserError(f"{path}: holds label {n_classes - 1} but {option} names {len(foreground)} foreground "
                            "class(es); name each label from 1 up, e.g. RV,myocardium,LV")
        n_classes = len(foreground) + 1  # classes named but absent from both files are listed too
        names = ["background", *foreground]
    else:  # the names the label files carry, PRED's first, if they cover its labels
        names = next((stored for stored in named if stored and len(stored) >= n_classes), None)
        n_classes = len(names) if names else n_classes
    frames = [evaluate_segmentation(pf, tf, n_classes, t.spacing, names) for pf, tf, t in zip(ps, ts, truths)]
    if len(frames) == 1:
        return frames[0]
    from coral_core.metrics import summarise_cases

    # each class's and the mean's average over the frames where they are defined, infinite HD95s counted
    result = summarise_cases(frames)
    result["frames"] = frames
    return result


def _score_lines(result: dict, label: str = "class") -> list[str]:
    lines = [f"{label:>12} {'Dice':>7} {'HD95 mm':>9}"]
    for name in result["dice"]:
        lines.append(f"{name:>12} {result['dice'][name]:7.3f} {result['hd95'][name]:9.2f}")
    lines.append(f"{'mean':>12} {result['mean_dice']:7.3f} {result['mean_hd95']:9.2f}")
    return lines


def _missed_lines(result: dict, unit: str) -> list[str]:
    """A line naming how many infinite HD95s (a class in only one of the two files) the means leave out, if any."""
    missed = sum(result.get("hd95_missed", {}).values())
    if not missed:
        return []
    if any("frames" in case for case in result.get("cases", ())):
        unit = "case or frame"
    return [f"HD95 leaves out {missed} {unit}-class pair(s) with an infinite distance (a class in one file only: "
            "hd95_missed in --json)"]


def _evaluate_folders(args, label_values: list[int] | None) -> tuple[dict, str]:
    """`coral evaluate PRED_DIR TRUTH_DIR`: every prediction scored against its case's reference labels."""
    from coral_core.data import case_images, evaluation_pairs
    from coral_core.metrics import summarise_cases
    from coral_core.volume import is_dicom_labels

    pred_dir, truth_dir = Path(args.pred), Path(args.truth)
    if not truth_dir.is_dir():
        raise UserError(f"{truth_dir}: a file, but PRED {pred_dir} is a folder; give the folder of reference labels "
                        "(or the dataset folder that was segmented) as TRUTH")
    pairs, unmatched, missing = evaluation_pairs(pred_dir, truth_dir)
    if not pairs:
        held = f"its {_count_of(len(unmatched), 'label file')}" if unmatched else "no label file"
        raise UserError(f"{pred_dir}: {held} matching none of {truth_dir}'s reference labels by name; give the folder "
                        "coral segment --out-dir wrote (NAME_labels.nii.gz) and the dataset folder it segmented")
    cases, images, incomplete = [], None, []
    for name, pred, truth in pairs:
        grid = None
        if is_dicom_labels(pred) or is_dicom_labels(truth):  # neither has a grid, or a cine's phases: the case's image's
            images = images if images is not None else case_images(truth_dir)
            grid = images.get(name)
        try:
            scored = _score_pair(pred, truth, args.class_names, label_values, grid, _structures_option(args))
        except MissingStructureError as exc:  # a case without one of --structures: not scored, as fine-tuning skips it
            incomplete.append((truth, exc))
            continue
        cases.append({"name": name, "pred": str(pred), "truth": str(truth), **scored})
    _leave_out(incomplete, bool(cases), "the case is not scored")
    incomplete = [truth for truth, _ in incomplete]
    result = summarise_cases(cases)
    result |= {"cases": cases, "unmatched_predictions": [str(p) for p in unmatched],
               "missing_predictions": [str(p) for p in missing]}
    if incomplete:
        result["without_structures"] = [str(p) for p in incomplete]
    width = max(12, *(len(c["name"]) for c in cases))
    lines = [f"{'case':<{width}} {'Dice':>7} {'HD95 mm':>9}"]
    lines += [f"{c['name']:<{width}} {c['mean_dice']:7.3f} {c['mean_hd95']:9.2f}" for c in cases]
    lines += ["", f"{_count_of(len(cases), 'case')}; each class's number is its mean over the cases that hold it "
                  "(per case and class: --json)"]
    lines += _score_lines(result)
    lines += _missed_lines(result, "case")
    for files, what in ((unmatched, "prediction(s) without reference labels"),
                        (missing, "reference label file(s) without a prediction"),
                        ([Path(p) for p in incomplete], "case(s) without every structure of --structures")):
        if files:
            shown = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
            lines.append(f"not scored: {len(files)} {what} ({shown})")
    return result, "\n".join(lines)


def cmd_evaluate(args) -> tuple[dict, str]:
    from coral_core.data import holds_dicom_labels, parse_label_values
    from coral_core.volume import is_volume_path

    label_values = parse_label_values(args.label_values) if args.label_values else None
    _structures_option(args)  # checked before any file is read
    if Path(args.pred).is_dir() and not (is_volume_path(args.pred) and not holds_dicom_labels(args.pred)):
        return _evaluate_folders(args, label_values)  # a folder of label files (DICOM SEG files among them)
    if Path(args.truth).is_dir() and not is_volume_path(args.truth):
        raise UserError(f"{args.truth}: a folder, but PRED {args.pred} is one file; give its reference label file, "
                        "or give PRED as the folder coral segment --out-dir wrote")
    if args.image is not None and not Path(args.image).exists():
        raise UserError(f"{args.image}: no such file or folder; give the image PRED and TRUTH were drawn on as --image")
    result = _score_pair(args.pred, args.truth, args.class_names, label_values, args.image, _structures_option(args))
    lines = _score_lines(result)
    if "frames" in result:
        lines.insert(0, f"{len(result['frames'])} frames; each number is the mean over the frames (per frame: --json)")
        lines += _missed_lines(result, "frame")
    return result, "\n".join(lines)


def _model_files(paths: list[str]) -> list[tuple[Path, bool]]:
    """(file, named by the user) for each MODEL given: a file as given, a folder as its .safetensors and .pth files."""
    out = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(f for f in given.iterdir() if f.suffix in (".safetensors", ".pth", ".pt") and f.is_file())
            if not found:
                raise UserError(f"{given}: folder holds no .safetensors or .pth model; give a model file or its folder")
            out += [(f, False) for f in found]
        else:
            out.append((given, True))
    return out


def cmd_info(args) -> tuple[dict, str]:
    from coral_core.checkpoint import describe_checkpoint

    models, unreadable, blocks = [], [], []
    for path, named in _model_files(args.models):
        try:
            info = describe_checkpoint(path)
        except UserError as exc:
            if named:
                raise
            unreadable.append({"path": str(path), "error": str(exc)})
            blocks.append(f"{path}: not read ({exc})")
            continue
        models.append(info)
        arch = info["architecture"]
        scale = (f" at {info['pixel_spacing']:g} mm (a {info['field_of_view_mm']:g} mm square of a slice at a time)"
                 if info["pixel_spacing"] is not None else ", each slice resized whole")
        lines = [f"{path}: {info['trained']}",
                 # a pretrained-only model's classes are placeholders (the architecture's default); fine-tuning names them
                 "  classes: none yet" if info["pretrained_only"] else f"  classes: {', '.join(info['classes'])}",
                 f"  U-Net: {arch['base_filters']} base filters, depth {arch['depth']}, {arch['norm']} norm, "
                 f"{info['parameters'] / 1e6:.2f} M parameters ({info['weights']}, {info['bytes'] / 1e6:.1f} MB); "
                 f"{arch['image_size']} px input{scale}",
                 f"  embedding: {arch['embedding_dim']}-d, " + ("with a learned canonical direction (OAL)"
                                                              if info["canonical_direction"] else "no canonical direction")]
        if info["pretrained_only"]:
            lines.append("  pretrained only: its segmentation head is untrained; fine-tune it before segmenting")
        blocks.append("\n".join(lines))
    return {"models": models, "unreadable": unreadable}, "\n\n".join(blocks)


def cmd_demo(args) -> tuple[dict, str]:
    from coral_core.checkpoint import save_checkpoint
    from coral_core.demo import DemoConfig, run_demo
    from coral_core.fileio import check_output_path

    if args.save_model:  # before the demo's minutes of work, not after, and before its folder is made
        _check_model_output(args.save_model, "--save-model")
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc}); choose another --out-dir") from None
    check_output_path(out_dir / "demo_segmentation.png")  # a folder that exists but cannot be written to
    cfg = DemoConfig(n_unlabelled=args.phantom, epochs=args.epochs, steps=args.steps, seed=args.seed, device=args.device,
                     cpu_bf16=args.cpu_bf16)
    stages = {}

    def make_callback(stage, total):
        bar, cb = _progress(total, stage, args.json)
        stages[stage] = bar
        return cb

    result = run_demo(cfg, out_dir, make_callback)
    for bar in stages.values():
        bar.close()
    if args.save_model:
        save_checkpoint(args.save_model, result.model, result.training, half=True)
    out = {"dice": result.metrics["dice"], "mean_dice": result.metrics["mean_dice"],
           "mean_hd95": result.metrics["mean_hd95"], "figure": str(result.figure), "seconds": round(result.seconds, 1),
           "model": args.save_model, "pretrain_steps": result.pretrain_steps}
    lines = [f"CORAL demo on the phantom cohort ({result.seconds:.0f} s)"]
    steps = _count_of(result.pretrain_steps, "pretraining step")
    lines.append(f"  {steps} of CORAL" + (f", a demonstration: {result.pretrain_advice}" if result.pretrain_advice
                                          else ""))
    lines += [f"  Dice {name:<11} {d:.3f}" for name, d in result.metrics["dice"].items()]
    lines.append(f"  mean Dice {result.metrics['mean_dice']:.3f}, mean HD95 {result.metrics['mean_hd95']:.1f} mm")
    lines.append(f"  figure: {result.figure}")
    if args.save_model:
        lines.append(f"  model: {args.save_model}")
    return out, "\n".join(lines)


def _stage_printer():
    """Progress of a benchmark on stderr, with --json too (stdout keeps the JSON): a run stopped
    early, at a time limit say, has still reported every result it measured."""
    t0 = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {text}", file=sys.stderr, flush=True)

    return say


PRETRAIN_PHANTOM_SEED = 100_000  # the first seed of `coral bench lowlabel --pretrain-phantom`'s subjects


def cmd_bench_lowlabel(args) -> tuple[dict, str]:
    from coral_core.lowlabel import (
        LowLabelConfig, best_checkpoint_runs, best_checkpoint_summary, format_best_checkpoint, format_paired,
        format_paired_by_seed, format_pooled, format_run_counts, format_table, load_labelled_cases,
        paired_differences, run_lowlabel,
    )

    options = {
        "methods": tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        "labeled": _int_list(args.labeled, "--labeled") if args.labeled else None,
        "folds": args.folds, "fold_seed": args.fold_seed, "seeds": args.seeds, "device": args.device,
        "pretrain_epochs": args.pretrain_epochs, "pretrain_lr": args.pretrain_lr, "pretrain_batch": args.pretrain_batch,
        "finetune_steps": args.finetune_steps,
        "finetune_lr": args.finetune_lr, "finetune_balance_classes": args.balance_classes, "cpu_bf16": args.cpu_bf16,
        "workers": args.workers, "finetune_freeze_encoder": args.freeze_encoder or None,
        "finetune_augment": args.finetune_augment, "base_filters": args.base_filters, "image_size": args.image_size,
        "finetune_slices": args.labeled_slices,
        "finetune_scale": _float_range(args.finetune_scale, "--finetune-scale", "0.7,1.4") if args.finetune_scale else None,
        "pretrain_scale": _float_range(args.pretrain_scale, "--pretrain-scale", "0.7,1.4") if args.pretrain_scale else None,
        "finetune_cohort_weight": args.finetune_cohort_weight, "pretrain_extra": args.pretrain_phantom,
        "finetune_encoder_lr_scale": args.encoder_lr_scale, "finetune_repeats": args.finetune_repeats,
        "pixel_spacing": args.pixel_spacing, "finetune_shift": args.finetune_shift, "score_every": args.score_every,
        "finetune_encoder_frozen_steps": args.freeze_encoder_steps,
    }
    if args.quick:
        cfg = LowLabelConfig.quick(**options)
    else:
        cfg = LowLabelConfig(**{k: v for k, v in options.items() if v is not None})
    if args.data is None and not args.phantom:
        args.phantom = 20 if args.quick else 100
    phantom_config, appearance = _phantom_appearance(args)
    phantoms = f"{args.phantom} phantom subjects{appearance}"
    label_values = None
    if args.label_values:
        from coral_core.data import parse_label_values

        if not args.data:
            raise UserError("--label-values renumbers the label files of --data DIR; give --data, or leave it out")
        label_values = parse_label_values(args.label_values)
    structures = _structures_option(args)
    if structures and not args.data:
        raise UserError("--structures picks structures of the label files of --data DIR; give --data, or leave it out")
    if args.pretrain_cine and not args.data:  # before any phantom is made
        raise UserError("--pretrain-cine pretrains on the 4-D cine files of --data DIR; give --data, or leave it out")
    data = f"{args.data} (label values {','.join(map(str, label_values))})" if label_values else args.data
    data = f"{data} (structures {','.join(structures)})" if structures else data
    source = (f"{data} + {phantoms}" if args.phantom else data) if args.data else phantoms
    extra = []
    if cfg.pretrain_extra:
        from coral_core.data import at_pixel_spacing
        from coral_core.phantom import make_cohort

        # seeds far above any cohort's (phantom0, phantom1, ...), so no extra subject is also a labelled one
        # (at --pixel-spacing, as the cases are brought to it in run_lowlabel)
        extra = [at_pixel_spacing(image.array, image.spacing, cfg.pixel_spacing, cfg.image_size)[0] if cfg.pixel_spacing
                 else image.array
                 for image, _ in make_cohort(cfg.pretrain_extra, seed=PRETRAIN_PHANTOM_SEED, config=phantom_config)]
        source = f"{source}, pretrained with {cfg.pretrain_extra} more phantom subjects"
    if args.pretrain_cine:
        from dataclasses import replace

        from coral_core.lowlabel import load_cine_frames

        cine = load_cine_frames(args.data, cfg.image_size, cfg.pixel_spacing)
        extra += cine
        cfg = replace(cfg, pretrain_extra=cfg.pretrain_extra + len(cine))
        source = f"{source}, pretrained with the {len(cine)} other frames of its cine files"
    earlier = None
    if args.table:
        from coral_core.fileio import check_output_path

        check_output_path(args.table)
        earlier = _read_lowlabel_table(args.table)
    cases = load_labelled_cases(args.data, args.phantom or 0, phantom_config=phantom_config, label_values=label_values,
                                structures=structures)

    def as_table(result) -> dict:
        paired = paired_differences(result.runs, "random") + paired_differences(result.runs, "coral")
        c = result.config
        complete = {(m, n, k, s) for m in c["methods"] for n in c["labeled"] for k in range(c["folds"])
                    for s in range(c["seeds"])} <= {(r["method"], r["labeled"], r["fold"], r["seed"]) for r in result.runs}
        return {"rows": result.rows, "paired": paired, "config": c, "runs": result.runs,
                "seconds": round(result.seconds, 1), "timings": result.timings, "complete": complete}

    def write(result) -> None:  # after every run: a run stopped early keeps what it measured
        if args.table:
            from coral_core.fileio import atomic_target

            with atomic_target(args.table, suffix=".json") as tmp:
                Path(tmp).write_text(json.dumps(_finite(as_table(result)), indent=1, allow_nan=False))
        written.append(len(result.runs))

    written: list[int] = []
    try:
        result = run_lowlabel(cfg, cases, _stage_printer(), source=str(source), earlier=earlier,
                              earlier_name=str(args.table), on_run=write, pretrain_extra=extra)
    except KeyboardInterrupt:
        if written:
            raise _Interrupted(f"interrupted; {args.table} holds the runs finished so far ({written[-1]}), and the "
                               "same command continues it") from None
        if earlier and earlier.get("runs"):  # nothing new finished: the table is as it was
            raise _Interrupted(f"interrupted before another run finished; {args.table} still holds its "
                               f"{len(earlier['runs'])} runs, and the same command continues it") from None
        raise
    write(result)
    out = as_table(result)
    paired = out["paired"]
    text = (f"low-label benchmark on {source}: {cfg.folds} folds x {result.config['seeds']} seeds, mean foreground Dice "
            f"+- std over folds and seeds (mean HD95 mm), {result.seconds:.0f} s on {result.config['device']}\n"
            + format_table(result.rows))
    counts = format_run_counts(result.rows)
    if counts:
        text += "\n" + counts
    pooled = format_pooled(result.rows)
    if pooled:
        text += ("\n\nDice pooled over each fold's test slices (overlap and sizes summed before dividing), as the "
                 "published code scores; mean over runs:\n" + pooled)
    for reference in ("random", "coral"):
        table = format_paired([r for r in paired if r["reference"] == reference])
        if table:
            text += (f"\n\npaired with {reference} (same folds, seeds and labelled volumes; wins/runs, two-sided "
                     f"sign test p):\n" + table)
        by_seed = format_paired_by_seed([r for r in paired if r["reference"] == reference])
        if by_seed:
            text += ("\n\nthe same counted by pretraining (a seed's runs share one pretraining, which the count by run "
                     "ignores): the mean of the seeds' mean differences over their folds +- its standard error, and "
                     "the seeds whose mean is above 0:\n" + by_seed)
    best_runs = best_checkpoint_runs(result.runs)
    best = best_checkpoint_summary(result.runs, result.config["methods"], result.config["labeled"], best=best_runs)
    if best:
        out["best_checkpoint"] = best
        text += ("\n\neach run also scored at its best checkpoint on the test fold (the published code keeps its best "
                 "epoch; this picks on the test data, so it is optimistic):\n"
                 + format_best_checkpoint(result.runs, best=best_runs))
        for reference in ("random", "coral"):
            table = format_paired([r for r in best["paired"] if r["reference"] == reference])
            if table:
                text += f"\n\nat the best checkpoint, paired with {reference}:\n" + table
    return out, text


def _read_lowlabel_table(path) -> dict | None:
    """An existing --table file to continue; None if there is none yet."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        table = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: cannot be read as a benchmark table ({exc}); give another --table file") from None
    if not isinstance(table, dict) or not isinstance(table.get("runs"), list) or not isinstance(table.get("config"), dict):
        raise UserError(f"{p}: is not a table written by coral bench lowlabel; give another --table file")
    return table


def cmd_bench_embedding(args) -> tuple[dict, str]:
    from coral_core.fileio import check_output_path
    from coral_core.lowlabel import EmbeddingFigureConfig, run_embedding_figure

    _check_png(args.out)
    check_output_path(args.out)
    cfg = EmbeddingFigureConfig(device=args.device, seed=args.seed, pretrain_subjects=args.phantom,
                                pretrain_epochs=args.epochs, shown_subjects=args.show)
    scores = run_embedding_figure(cfg, args.out, _stage_printer())
    lines = [f"wrote {args.out}; ordinal consistency on {cfg.shown_subjects} unseen subjects:"]
    for method, s in scores.items():
        per = ", ".join(f"{v:.2f}" for v in s["subjects"].values())
        lines.append(f"  {method:<6} pooled {s['pooled']:.3f} (per subject {per})")
    return {"figure": str(args.out), "scores": scores}, "\n".join(lines)


def cmd_bench_speed(args) -> tuple[dict, str]:
    from coral_core.device import resolve_device
    from coral_core.speedbench import SpeedConfig, format_levers_table, format_speed_table, run_levers, run_speed

    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        raise UserError(f"--peak-tflops {args.peak_tflops:g}: give the device's peak in TFLOP/s, a number above 0 "
                        "(an H100 SXM's dense bf16: 989.4)")
    options = {"device": args.device, "baseline": not args.no_baseline, "peak_tflops": args.peak_tflops,
               "levers": _levers(args)}
    quick = args.quick or resolve_device(args.device).type != "cuda"
    say = _stage_printer()
    if quick and not args.quick:
        say("no CUDA device: measuring the --quick configuration (the full one is for a GPU)")
    cfg = SpeedConfig.quick(**options) if quick else SpeedConfig(**options)
    where = "quick" if quick else "full"
    if args.levers is not None:
        result = run_levers(cfg, args.levers, say)
        result["configuration"] = where
        info = result["device"]
        return result, (f"speed levers on {info['name']} ({info['device']}, torch {info['torch']}), {where} "
                        f"configuration; our engine with each lever, ratios against none\n" + format_levers_table(result))
    result = run_speed(cfg, say)
    result["configuration"] = where
    info = result["device"]
    text = (f"speed on {info['name']} ({info['device']}, torch {info['torch']}, {info['threads']} CPU threads), "
            f"{where} configuration; baseline: float32, eager, augmentation slice by slice on "
            f"the CPU\n" + format_speed_table(result))
    return result, text


def _phantom_appearance(args):
    """The phantom cohort's PhantomConfig from ``--phantom-bias`` and ``--phantom-noise``, and the text that
    names a non-default one in the benchmark's source ("" for the defaults, so older tables continue)."""
    from coral_core.phantom import PhantomConfig

    config = PhantomConfig()
    changed = []
    if args.phantom_bias is not None:
        if not 0 <= args.phantom_bias < float("inf"):
            raise UserError(f"--phantom-bias {args.phantom_bias}: give a peak-to-peak range of 0 or more, e.g. 1.0")
        config.bias = float(args.phantom_bias)
        changed.append(f"bias {config.bias:g}")
    if args.phantom_noise is not None:
        low, high = _float_range(args.phantom_noise, "--phantom-noise", "0.05,0.2", zero_allowed=True)
        config.noise = (low, high)
        changed.append(f"noise {low:g}-{high:g}")
    if args.phantom_fov is not None:
        low, high = _float_range(args.phantom_fov, "--phantom-fov", "0.8,1.6")
        if low < 0.75 or high > 4:
            raise UserError(f"--phantom-fov {args.phantom_fov}: give a range within 0.75-4 (below 0.75 the cut would "
                            "reach the heart), e.g. 0.8,1.6")
        config.field_of_view = (low, high)
        changed.append(f"field of view {low:g}-{high:g}x")
    if changed and args.data and not args.phantom:
        raise UserError("--phantom-bias, --phantom-noise and --phantom-fov change the phantom cohort; add --phantom N, "
                        "or leave them out with --data")
    return config, f" ({', '.join(changed)})" if changed else ""


def _count_of(n: int, thing: str) -> str:
    """'1 slice', '3 slices'."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


_LARGEST = 2**31 - 1  # a whole number beyond it is no size or count a tensor or a run can have


def _whole_number(minimum: int, what: str):
    """An argparse type: a whole number of at least ``minimum`` and at most 2**31 - 1 (``what``: what it counts,
    for its docstring)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {bound}")
        if value > _LARGEST:
            raise argparse.ArgumentTypeError(f"{text!r} is too large: give a whole number up to {_LARGEST}")
        return value

    parse.__doc__ = f"argparse type of {what}: a whole number from {minimum} to {_LARGEST}."
    return parse


_positive_int = _whole_number(1, "a size (filters, embedding width, batch) or a count that cannot be 0")
_count = _whole_number(0, "a number of things (phantom subjects, steps, folds)")


def _seed(text: str) -> int:
    """argparse type of a seed: a whole number from 0 to 2**32 - 1, which NumPy's and torch's generators all take."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: give a whole number from 0 to {2**32 - 1}")
    return value


def _check_model_output(path: str, option: str, inputs=()) -> None:
    """A model is written as one .safetensors file, into a folder that exists, over none of the command's inputs."""
    from coral_core.fileio import check_not_an_input, check_output_path

    if not str(path).lower().endswith(".safetensors"):
        raise UserError(f"{option} {path}: models are written as safetensors; end the name with .safetensors")
    check_output_path(path)
    check_not_an_input(path, inputs)


def _check_png(path: str) -> None:
    """Figures are written as PNG whatever the name: refuse a name that promises another format."""
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"{path}: figures are written as PNG; end the name with .png")


def _float_range(text: str, option: str, example: str, zero_allowed: bool = False) -> tuple[float, float]:
    """``LOW,HIGH`` from the command line, with 0 < LOW <= HIGH (0 <= LOW with ``zero_allowed``)."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        low, high = float("nan"), float("nan")
    if not ((0 <= low if zero_allowed else 0 < low) and low <= high < float("inf")):
        raise UserError(f"{option} {text!r}: give LOW,HIGH with {'0 <=' if zero_allowed else '0 <'} LOW <= HIGH, "
                        f"e.g. {example}")
    return low, high


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: give whole numbers separated by commas, e.g. 1,2,6") from None


# --------------------------------------------------------------------------- parser


LABEL_VALUES_HELP = ("the values the label files use for classes 1, 2, ... in that order, when they are codes "
                     "rather than 1, 2, ... (MM-WHS: 205,420,500,550,600,820,850); any other value is read as "
                     "background, with a warning")
STRUCTURES_HELP = ("only the structures of these names, as classes 1, 2, ... in this order, the others background: "
                   "ROIs of RT structure sets (filled alone, so that others drawn over them take nothing), segments "
                   "of DICOM SEG files, classes of label files that name theirs (coral segment's); names matched "
                   "without regard to case; NAME|OTHER takes the first of those names a file holds (a structure "
                   "named differently from file to file, e.g. Heart|Cor), the class named by the first")
BALANCE_HELP = ("weight the cross-entropy by the square root of each class's inverse frequency in the batch, so "
                "that small classes are learned early (docs/results.md)")
SEED_HELP = "seed of the random initial weights, the order of slices and the augmentation (default 0)"
RESUME_HELP = (
    "continue from OUT's resume file (OUT with .resume.safetensors), which is written as the run goes and "
    "when Ctrl-C stops it; the options must be the same"
)


def _cpu_bf16_option(p, benchmark: bool = False) -> None:
    if benchmark:  # LowLabelConfig.cpu_bf16: float32 unless asked
        p.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=False,
                       help="bfloat16 autocast on the CPU for every stage (default: off, float32, as the tables in "
                            "docs/results.md were measured; CUDA GPUs always use bf16)")
        return
    p.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast on the CPU (CUDA GPUs always use it). Default: on where the CPU has AMX "
                        "tiles, where it measured about 2x faster with the same results; float32 elsewhere")


def _lever_options(p, data: bool = False, inference: bool = False) -> None:
    from coral_core.levers import COMPILE_MODES

    g = p.add_argument_group("speed levers (docs/performance.md)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC layout for the convolutions (default: on for the CPU and CUDA GPUs, where it "
                        "measured faster)")
    g.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                   help="torch.compile mode (reduce-overhead adds CUDA graphs); costs time up front. auto (the "
                        "default): long pretraining runs on a CUDA GPU compile, nothing else does")
    g.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms for every new input shape and keep the fastest "
                        "(CUDA; 1.03-1.09x on an H100, slower for short runs)")
    g.add_argument("--pad-channels", action="store_true",
                   help="compute the one-channel first convolution with zero channels added up to 8, the same sums "
                        "in cuDNN's tensor-core kernels (CUDA; not measured yet)")
    _cpu_bf16_option(g)
    if inference:
        g.add_argument("--fuse-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                       help="fold BatchNorm into the convolutions for inference (default: on for the CPU, where it "
                            "measured faster)")
    if data:
        g.add_argument("--data-on-device", action="store_true",
                       help="keep every slice on the GPU when they take at most a quarter of its free memory")
        g.add_argument("--prefetch", action="store_true",
                       help="copy the next step's slices to the GPU from pinned memory while a step computes "
                            "(CUDA; two measurements on an H100 disagree)")
        g.add_argument("--defer-metrics", action="store_true",
                       help="read each step's loss back once the next step is queued, so the GPU does not wait for "
                            "the host between steps (CUDA; not measured yet)")


def build_parser() -> argparse.ArgumentParser:
    from coral_core import __version__
    from coral_core.levers import LEVER_VARIANTS

    parser = _Parser(prog="coral", description="CORAL pretraining and few-slice segmentation for 3-D medical volumes.")
    parser.add_argument("--version", action="version", version=f"napari-coral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name, help_, func, parent=None, device_help="compute device (default: auto)"):
        p = (parent or sub).add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help=device_help)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        return p

    p = command("pretrain", "Self-supervised pretraining of the encoder on unlabeled volumes.", cmd_pretrain)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="volume files, DICOM folders or dataset folders")
    p.add_argument("--method", default="coral", choices=["coral", "ral", "oal", "pcl", "gcl", "simclr"],
                   help="objective: coral (RAL + OAL, the default), ral or oal alone, or the baselines pcl, gcl, "
                        "simclr (docs/losses.md)")
    p.add_argument("--epochs", type=_positive_int, default=10,
                   help="passes over the slices, each of slices // --batch-size steps (default 10; on phantoms CORAL "
                        "helped fine-tuning only after about 500 steps: docs/engine.md)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write (.safetensors)")
    p.add_argument("--phantom", type=_count, default=0, metavar="N", help="add N synthetic phantom subjects")
    p.add_argument("--batch-size", type=_whole_number(2, "slices per step, which the objectives compare"), default=32,
                   help="slices per step, at least 2 (default 32)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW's learning rate at the start, decayed along a cosine to 0 (default 0.001)")
    p.add_argument("--base-filters", type=_positive_int, default=16, help="U-Net base filters (default 16)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="model input size, a multiple of 16 (default: from the data, at most 256; 128 with "
                        "--pixel-spacing)")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="MM", help=PIXEL_SPACING_HELP)
    p.add_argument("--embedding-dim", type=_positive_int, default=128,
                   help="size of the slice embedding that the objectives compare (default 128)")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--ddp", action="store_true",
                   help="distributed over the processes torchrun starts (--batch-size is the global batch)")
    p.add_argument("--all-frames", action="store_true",
                   help="read every frame of a 4-D (cine) file as a volume of its own, and an ACDC patient as the "
                        "frames of its _4d cine file (about 30; the published methods pretrain on these) instead "
                        "of its ED and ES frames")
    p.add_argument("--slices-float16", action="store_true",
                   help="hold the resampled slices in float16: half the memory for a large cohort (training "
                        "itself stays float32/bf16; docs/performance.md)")
    p.add_argument("--slice-cache", default=None, metavar="FILE.npy",
                   help="keep the prepared slices in FILE.npy (described by FILE.npy.json): a later run on the same "
                        "inputs and settings maps it instead of reading every volume again, the processes of a --ddp "
                        "run share it, and a slice set larger than memory still trains")
    _lever_options(p, data=True)

    p = command("finetune", "Fine-tune on the annotated slices of one image or several.", cmd_finetune)
    p.add_argument("image", nargs="+", metavar="IMAGE",
                   help="the annotated image(s), or without --labels dataset folders (ACDC, imagesTr/labelsTr, "
                        "CASE_image beside CASE_label, a folder per case) whose labelled cases are used; a 4-D (cine) "
                        "image with 4-D labels trains on every frame that holds labels, each frame a scan; for a model "
                        "meant for other scans, a few slices in each of several scans did better than the same "
                        "number in one (docs/results.md)")
    p.add_argument("--labels", default=None, nargs="+", metavar="LABELS",
                   help="the label volume drawn on each IMAGE, in the same order (or a DICOM SEG or RT structure "
                        "set drawn on it)")
    p.add_argument("--slices", default=None, action="append", metavar="SLICES",
                   help="annotated slices, e.g. 3,7,9 or 2-5; once per IMAGE, in the same order (default: the slices "
                        "that hold any label)")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from this checkpoint (default: random init)")
    p.add_argument("--out", required=True, metavar="CKPT", help="model to write (.safetensors)")
    p.add_argument("--classes", type=_whole_number(2, "classes, background and at least one more"), default=None,
                   help="number of classes incl. background, at least 2 (default: from the labels)")
    p.add_argument("--label-values", default=None, metavar="V1,V2,...", help=LABEL_VALUES_HELP)
    p.add_argument("--structures", default=None, metavar="NAME,NAME,...", help=STRUCTURES_HELP)
    p.add_argument("--class-names", default=None, help="names of the foreground classes in label order, e.g. GM,WM")
    p.add_argument("--steps", type=_positive_int, default=200, help="training steps (default 200)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="annotated slices per step, drawn at random and augmented (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 0.003, as FinetuneConfig)")
    p.add_argument("--embedding-weight", type=float, default=0.1,
                   help="weight of the CORAL loss that keeps a CORAL-pretrained model's embedding in slice order "
                        "while fine-tuning (default 0.1; 0: off, about 1.7x faster)")
    p.add_argument("--embedding-every", type=_positive_int, default=1, metavar="K",
                   help="that loss on every K-th step only, at K times the weight (default 1; 2 fine-tuned about "
                        "1.3x faster with the same embedding, and a Dice lower in most runs: docs/results.md)")
    p.add_argument("--balance-classes", action="store_true", help=BALANCE_HELP)
    p.add_argument("--unlabelled", nargs="+", default=None, metavar="INPUT",
                   help="images without labels (files or folders) whose slices join the embedding loss while "
                        "fine-tuning, at --embedding-weight, from any init: semi-supervised (docs/results.md)")
    p.add_argument("--zoom", default=None, metavar="LOW,HIGH",
                   help="zoom range of the augmentation (default 0.85,1.15); 0.7,1.4 made models that did better on "
                        "other subjects and slightly worse on the annotated one (docs/results.md)")
    p.add_argument("--base-filters", type=_positive_int, default=None,
                   help=f"U-Net base filters (default {FINETUNE_BASE_FILTERS}; with --init, the model's own)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="model input size, a multiple of 16 (default: from the scans, at most 256; 128 with "
                        "--pixel-spacing; with --init, the model's own)")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                   help=PIXEL_SPACING_HELP + "; with --init, the model's own, if it has one")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _lever_options(p)

    p = command("segment", "Segment a volume, or many (a 4-D cine series frame by frame); labels keep each input's "
                "shape and geometry.", cmd_segment)
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="a volume file or DICOM series folder; with --out-dir also several, and dataset folders")
    p.add_argument("--model", default=None, metavar="CKPT", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--out", default=None, metavar="LABELS",
                   help="label volume to write (.nii.gz, .mha, .nrrd; or .dcm, a DICOM SEG on a DICOM INPUT's images, "
                        "or with --rt-struct an RT structure set), for one INPUT")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="folder (created if missing) for NAME_labels of every volume, in its input's format (DICOM: "
                        ".nii.gz, or with --dicom-seg a DICOM SEG, with --rt-struct an RT structure set); the model is "
                        "loaded once")
    p.add_argument("--dicom-seg", action="store_true",
                   help="with --out-dir: write the labels of each DICOM input (a cine's: every frame's) as a DICOM "
                        "SEG on its images (NAME_labels.dcm); other inputs as without it")
    p.add_argument("--rt-struct", action="store_true",
                   help="DICOM labels as an RT structure set (closed contours, as radiotherapy planning systems "
                        "import them) instead of a SEG: --out NAME.dcm, or with --out-dir each DICOM input's as "
                        "NAME_labels.dcm")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="slices per forward pass (default 16; halved by itself if the device runs out of memory)")
    p.add_argument("--largest-component", action="store_true",
                   help="keep each class's largest connected piece per volume (3-D: through faces, edges or corners) "
                        "and make its other pieces background: for anatomy of one piece per class, such as the "
                        "heart's; a class of several organs (both kidneys) would keep one")
    _lever_options(p, inference=True)

    p = command("embed", "Per-slice embeddings, their 2-D trajectory and ordinal consistency.", cmd_embed)
    p.add_argument("images", nargs="*", metavar="INPUT", help="volume files, DICOM folders or dataset folders")
    p.add_argument("--phantom", type=_count, default=0, metavar="N",
                   help="add N synthetic phantom subjects (phantomS, phantomS+1, ... for --seed S)")
    p.add_argument("--seed", type=_seed, default=0, help="the first phantom subject's seed (default 0)")
    p.add_argument("--model", default=None, metavar="CKPT", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--out", required=True, metavar="TABLE.csv",
                   help="table to write: a row per slice (volume, slice, position, axis1, axis2, volume_score)")
    p.add_argument("--plot", default=None, metavar="FIG.png",
                   help="also draw every volume's trajectory in that 2-D projection into this figure")
    p.add_argument("--all-frames", action="store_true",
                   help="embed every frame of a 4-D (cine) file as a volume of its own (SUBJECT_t00, SUBJECT_t01, ...), "
                        "and an ACDC patient as the frames of its _4d cine file")

    p = command("evaluate", "Dice and HD95 of a segmentation against ground truth, or of a folder of them.",
                cmd_evaluate)
    p.add_argument("pred", metavar="PRED", help="the label volume to score, e.g. written by coral segment; or the "
                   "folder coral segment --out-dir wrote, every file in it scored against its case's labels in TRUTH")
    p.add_argument("truth", metavar="TRUTH", help="the reference label volume of the same image (or a DICOM SEG or "
                   "RT structure set drawn on it); for a PRED folder, "
                   "the dataset folder segmented (ACDC, imagesTr/labelsTr, images beside their _gt files) or a folder "
                   "of label files named as the images were")
    p.add_argument("--class-names", default=None,
                   help="names of the foreground classes in label order, e.g. RV,myocardium,LV (default: the numbers)")
    p.add_argument("--label-values", default=None, metavar="V1,V2,...",
                   help="the values TRUTH uses for classes 1, 2, ... when they are codes (MM-WHS: 205,420,...,850); "
                        "PRED holds class numbers, as coral segment writes them")
    p.add_argument("--structures", default=None, metavar="NAME,NAME,...",
                   help="TRUTH's structures of these names as classes 1, 2, ..., and PRED's when it names its classes "
                        "(coral segment's files, DICOM SEG, RT structure sets; else PRED's labels are taken as those "
                        "classes): " + STRUCTURES_HELP)
    p.add_argument("--image", default=None, metavar="IMAGE",
                   help="the image PRED and TRUTH were drawn on, when both are DICOM SEG or RT structure set files "
                        "(which hold no voxel grid of their own), or when one is and the image is a DICOM cine series "
                        "(the other file cannot say which images are which phase)")

    p = command("info", "Describe model files: classes, architecture, scale, and how each was trained.", cmd_info,
                device_help="taken as every command takes it, and unused: a model file is read on the CPU")
    p.add_argument("models", nargs="+", metavar="MODEL", help="a .safetensors (or .pth) model, or a folder of them "
                   "(such as ~/.napari-coral/models, where the plugin keeps every model it trained)")

    p = command("demo", "Phantom cohort -> CORAL pretraining -> fine-tune on 2 subjects -> segment a held-out one.", cmd_demo)
    p.add_argument("--out-dir", default="coral-demo", help="where the figure goes (default: ./coral-demo)")
    p.add_argument("--phantom", type=_count, default=16, metavar="N",
                   help="unlabelled subjects for pretraining (default 16; the 2 labelled ones pretrain too)")
    p.add_argument("--epochs", type=_positive_int, default=6,
                   help="CORAL pretraining epochs (default 6: 42 steps with the default cohort, a demonstration; the "
                        "demo says how many would reach the 500 after which pretraining helped on phantoms)")
    p.add_argument("--steps", type=_positive_int, default=200, help="fine-tuning steps (default 200)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the cohort, the pretraining and the fine-tuning")
    p.add_argument("--save-model", default=None, metavar="CKPT", help="also save the fine-tuned model")
    _cpu_bf16_option(p)

    bench = sub.add_parser("bench", help="Benchmarks: low-label segmentation, embedding figure, speed.",
                           description="Benchmarks that reproduce the CORAL paper's experiments with this engine, and its speed.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=_Parser, required=True)
    p = command("lowlabel", "Pretrain every method, fine-tune on M labelled volumes per fold, score held-out Dice.",
                cmd_bench_lowlabel, bench_sub)
    p.add_argument("--quick", action="store_true", help="small model and schedules: under 10 minutes on a 2-core CPU")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="ACDC-style folder, one with imagesTr/labelsTr, or one with CASE_image and CASE_label files "
                        "side by side (CHD)")
    p.add_argument("--label-values", default=None, metavar="V1,V2,...", help=LABEL_VALUES_HELP + " (with --data)")
    p.add_argument("--structures", default=None, metavar="NAME,NAME,...", help=STRUCTURES_HELP + " (with --data)")
    p.add_argument("--phantom", type=_count, default=None, metavar="N", help="N phantom subjects (default without --data: 20 quick, 100 full)")
    p.add_argument("--labeled", default=None, help="labelled volumes per fold, e.g. 1,2,6 (default: 1 quick; 1,2,6 full)")
    p.add_argument("--folds", type=_count, default=None, help="cross-validation folds (default: 2 quick, 5 full)")
    p.add_argument("--fold-seed", type=_seed, default=None, metavar="N",
                   help="seed of the split into folds, one split shared by every run (default 0); another N gives "
                        "another split, a separate table")
    p.add_argument("--seeds", type=_count, default=None, help="repeats with seeds 0..S-1 (default: 3)")
    p.add_argument("--methods", default=None, help="comma-separated subset of random,simclr,gcl,pcl,coral,ral,oal")
    p.add_argument("--pretrain-epochs", type=_count, default=None,
                   help="pretraining epochs, for every method (default: 8 quick, 50 full; 8 under-train CORAL, which "
                        "in the quick setting needed 64 before its pretraining showed: docs/results.md)")
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help="pretraining learning rate, for every method (default 0.001; cosine decay over the epochs)")
    p.add_argument("--pretrain-batch", type=_count, default=None, metavar="B",
                   help="pretraining batch in slices, for every method (default: 32 quick, 64 full); an epoch is "
                        "the cohort's slices // B steps")
    p.add_argument("--finetune-steps", type=_count, default=None,
                   help="fine-tuning steps of every run (default: 300 quick, 1000 full)")
    p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default 0.01)")
    p.add_argument("--balance-classes", action=argparse.BooleanOptionalAction, default=None,
                   help="class-balanced cross-entropy in fine-tuning (default: on here; see coral finetune)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="fine-tune the decoder and head only, the encoder as pretrained (or as randomly initialised): "
                        "what each encoder holds by itself")
    p.add_argument("--freeze-encoder-steps", type=_count, default=None, metavar="N",
                   help="keep the encoder frozen for the first N fine-tuning steps, then train it with the rest "
                        "(linear probing, then fine-tuning), for every method (default 0)")
    p.add_argument("--finetune-repeats", type=_positive_int, default=None, metavar="R",
                   help="fine-tune each run R times with different fine-tuning seeds (the first the run's own) and "
                        "average their Dice: less of the spread that fine-tuning trajectories add (default 1)")
    p.add_argument("--encoder-lr-scale", type=float, default=None, metavar="F",
                   help="fine-tune the encoder at F times the learning rate, the decoder and head at the full rate "
                        "(default 1)")
    p.add_argument("--labeled-slices", type=_count, default=None, metavar="K",
                   help="annotated slices per labelled volume, evenly spaced from base to apex, as a user paints a "
                        "few (default 0: every slice)")
    p.add_argument("--finetune-scale", default=None, metavar="LOW,HIGH",
                   help="zoom range of the fine-tuning's augmentation (default 0.85,1.15)")
    p.add_argument("--finetune-shift", type=float, default=None, metavar="F",
                   help="largest shift of the fine-tuning's augmentation, a fraction of the input (default 0.08)")
    p.add_argument("--score-every", type=_count, default=None, metavar="K",
                   help="also score the test fold every K fine-tuning steps, and print what keeping each run's best "
                        "checkpoint on it would report, as the published code keeps its best epoch (optimistic: it "
                        "picks on the test data; the runs' own Dice stay those at the end)")
    p.add_argument("--pretrain-scale", default=None, metavar="LOW,HIGH",
                   help="zoom range of the pretraining's augmentation, for every method (default 0.85,1.15)")
    p.add_argument("--finetune-cohort-weight", type=float, default=None, metavar="W",
                   help="add the CORAL loss on every unlabelled subject's slices to the fine-tuning, at weight W, for "
                        "every method (default 0: off)")
    p.add_argument("--pretrain-cine", action="store_true",
                   help="with --data: every method also pretrains on the other frames of the folder's 4-D cine files "
                        "(ACDC's patientXXX_4d.nii.gz, about 30 frames a patient), as the published methods do")
    p.add_argument("--pretrain-phantom", type=_count, default=None, metavar="N",
                   help="N more phantom subjects, unlabelled, that join every method's pretraining only (default 0)")
    p.add_argument("--finetune-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="augment the labelled slices while fine-tuning (default: on; pretraining augments either way)")
    p.add_argument("--base-filters", type=_positive_int, default=None, help="U-Net base filters (default: 8 quick, 48 full)")
    p.add_argument("--phantom-bias", type=float, default=None, metavar="RANGE",
                   help="peak-to-peak range of each phantom's smooth multiplicative bias field (default 0.35)")
    p.add_argument("--phantom-noise", default=None, metavar="LOW,HIGH",
                   help="range of each phantom's Rician noise, a fraction of its blood-pool signal (default 0.03,0.08)")
    p.add_argument("--phantom-fov", default=None, metavar="LOW,HIGH",
                   help="range of each phantom's field of view, a factor of its 230 mm at the same 1.8 mm spacing (the "
                        "centre cut out, or background noise around it), as scanners' protocols differ (default: 1,1)")
    p.add_argument("--image-size", type=_count, default=None, help="model input size (default: 64 quick, 128 full)")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                   help="resample every scan in-plane to MM per pixel and centre-crop or pad it to --image-size, and "
                        "score there, as the published code prepares ACDC (1.25 mm, --image-size 352); default: each "
                        "slice resized whole, scored at the scan's own resolution")
    _cpu_bf16_option(p, benchmark=True)
    p.add_argument("--workers", type=_count, default=None, metavar="N",
                   help="run N (seed, method) units side by side in processes that split the CPU threads and share "
                        "the GPU (default: 2 quick, 1 full); a run does not depend on the process that ran it")
    p.add_argument("--table", default=None, metavar="FILE.json",
                   help="also write rows, runs and config to this file, after every run; an existing table of the "
                        "same protocol is continued (its runs are not run again)")
    p = command("embedding", "PCL and CORAL slice-embedding trajectories of unseen subjects in one figure.",
                cmd_bench_embedding, bench_sub)
    p.add_argument("--out", required=True, metavar="FIG.png", help="figure to write (.png)")
    p.add_argument("--phantom", type=_positive_int, default=20, metavar="N", help="phantom subjects to pretrain on")
    p.add_argument("--epochs", type=_positive_int, default=8, help="pretraining epochs of both methods (default 8)")
    p.add_argument("--show", type=_positive_int, default=5, help="unseen subjects drawn")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p = command("speed", "Pretraining and inference slices/s and fine-tuning time, ours next to a published-code-like baseline.",
                cmd_bench_speed, bench_sub)
    p.add_argument("--quick", action="store_true", help="small images and model: about 2 minutes on a 2-core CPU (the default without CUDA)")
    p.add_argument("--no-baseline", action="store_true", help="measure our engine only")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known GPUs are looked up)")
    p.add_argument("--levers", nargs="*", default=None, metavar="VARIANT",
                   help="instead of the baseline table, our engine with each speed lever (or the VARIANTs named: "
                        + ", ".join(repr(v) for v in LEVER_VARIANTS) + ")")
    _lever_options(p, inference=True)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, ``warning: ...``, as a user mistake is ``error: ...``."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one ``coral`` command; return its exit status. Warnings print as one line, and pretrain/finetune
    take over Ctrl-C, only while the command runs: a program calling this gets its own back afterwards. After a
    command stopped by Ctrl-C (status 130), further presses stay ignored: the process is on its way out (worker
    processes and files closing), and another press would only cut that short with a traceback."""
    showwarning = warnings.showwarning
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    warnings.showwarning = _show_warning
    status = None
    try:
        status = _run(argv)
        return status
    finally:
        warnings.showwarning = showwarning
        if on_main_thread and sigint is not None and status != 130:
            signal.signal(signal.SIGINT, sigint)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _STOP.clear()
    if args.command in ("pretrain", "finetune"):
        _stop_on_ctrl_c()
    finished = False
    try:
        result, text = args.func(args)
        finished = True
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _host_out_of_memory(exc):
            raise
        print(f"error: {_out_of_memory_sentence(args, exc)}", file=sys.stderr)
        return 2
    except _Interrupted as exc:
        _ignore_further_ctrl_c()
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        _ignore_further_ctrl_c()
        print("error: interrupted; no partial output was written", file=sys.stderr)
        return 130
    finally:
        _leave_ddp(finished)
    if result is not None:
        try:
            print(json.dumps(_finite(result), allow_nan=False) if args.json else text, flush=True)
        except BrokenPipeError:  # the reader left early (coral evaluate ... | head -3): the work is done
            return _stdout_closed()
    return 0


def _host_out_of_memory(exc: BaseException) -> bool:
    """The machine's memory refused an allocation: Python's MemoryError, or torch's CPU allocator giving up (a
    model or a batch far larger than the machine, as a slip of the keyboard asks: --base-filters 4800)."""
    return isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _out_of_memory_sentence(args, exc: BaseException) -> str:
    """What ran out of memory and which of the command's own options make it smaller."""
    import re

    asked = re.search(r"allocate (\d+) bytes", str(exc))
    size = f" (an allocation of {int(asked.group(1)) / 2**30:.1f} GiB failed)" if asked else ""
    levers = [f"--{dest.replace('_', '-')}" for dest in ("batch_size", "image_size", "base_filters", "embedding_dim")
              if hasattr(args, dest)]
    what = f"a smaller {', '.join(levers[:-1])}{' or ' if len(levers) > 1 else ''}{levers[-1]}, or " if levers else ""
    command = " ".join(w for w in (args.command, getattr(args, "bench", None)) if w)
    return f"coral {command} ran out of this machine's memory{size}; use {what}a machine with more memory"


def _stdout_closed() -> int:
    """Exit quietly when whatever read our standard output closed it, as shell tools do (status 141, a
    shell's for SIGPIPE); stdout then points at /dev/null, so the interpreter's last flush fails no more.
    (argparse's --help into such a pipe already ends quietly, with status 0.)"""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _leave_ddp(finished: bool = False) -> None:
    """Leave the process group. After a finished run every process first waits for the others
    (rank 0 may still be writing), so none tears its connections down under a peer. After an
    error there is no waiting: the other processes may never arrive."""
    dist = sys.modules.get("torch.distributed")  # not imported: nothing to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def _finite(value):
    """JSON has no NaN or infinity: such numbers (an absent class's Dice or HD95) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
