"""Damaged files against every reader a user's file meets: does each one either read or say, in one sentence, what
is wrong (``UserError``), never a traceback, a crash, a hang or a runaway allocation?

    python benchmarks/fuzz_readers.py                       # 200 damaged copies of each format
    python benchmarks/fuzz_readers.py --cases 50 --formats mha,seg --show 5

Each format starts from a small valid file written by the product's own writers (NIfTI, gzipped NIfTI, MetaImage,
NRRD, a DICOM series folder, a DICOM SEG and an RT structure set written on that series, a checkpoint, and cines of 3
phases: a 4-D NIfTI, a DICOM cine series folder and an enhanced multi-frame DICOM file) and is read by
what the CLI and the plugin call: ``frame_count`` and ``read_class_names`` (header looks, which must never raise),
then ``load_frames``, and what ``coral segment`` does next with each volume read (segmented by a tiny untrained
model without and with a physical scale, at the spacing read, and the labels saved as NIfTI); ``referenced_series``
and ``load_labels_like`` on the series for a SEG or structure set; ``describe_checkpoint`` and ``load_checkpoint``.
Each case damages a fresh copy in one of these ways, chosen by the case's own seed: cut short; a few bytes changed
(mostly in the header); a 2-, 4- or 8-byte field in the header set to 0, -1, the largest or the smallest integer; a
header line's value replaced (MetaImage and NRRD: a number made huge, negative, not a number or empty); a DICOM data
element's value (a string or a number) replaced or the element removed, in the file's bytes; the JSON header's
metadata changed, a field or a field of a field (checkpoint). A gzipped NIfTI is damaged inside the compression half
the time (else gzip's checksum refuses it all). A DICOM series has its middle slice's file damaged.

Every read runs in a forked child with an address-space limit (``--memory-gib`` above what the child holds when it
starts) and a time limit (``--timeout``), so an allocation that the damage asks for, a crash in a compiled reader or a
hang is counted, not suffered. The table counts, per format: read (the damage left a readable file), refused (one
UserError sentence), and the defects: another exception, out of memory, killed by a signal, timed out. ``--show K``
prints the first K defects of each kind with the case number that reproduces them (``--only FORMAT:CASE``).
Exits 1 when there is a defect.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from forked import run_forked  # noqa: E402

FORMATS = ("nii", "nii.gz", "mha", "nrrd", "dicom", "seg", "rtstruct", "checkpoint", "nii-cine", "dicom-cine",
           "enhanced")
EXTREMES = (0, -1, 2**31 - 1, -(2**31), 2**63 - 1)
TEXT_VALUES = ("-1", "0", "1e30", "99999999999", "nan", "", "abc", "1 2", "-0.0")


MODELS = []  # two tiny untrained models, one with a physical scale (1.5 mm): what a read volume is segmented with


def make_models() -> None:
    from coral_core.model import UNet, UNetConfig

    for mm in (None, 1.5):
        config = UNetConfig(n_classes=3, base_filters=4, depth=2, embedding_dim=8, image_size=32,
                            class_names=["background", "Liver", "Heart"], pixel_spacing=mm)
        MODELS.append(UNet(config).eval())


def make_seeds(folder: Path) -> dict[str, Path]:
    """One small valid file of each format (and the series a SEG or structure set lies on)."""
    from helpers import write_dicom_series, write_enhanced_dicom

    from coral_core.checkpoint import save_checkpoint
    from coral_core.dicomlabels import save_dicom_seg, save_rt_structure_set
    from coral_core.model import UNet, UNetConfig
    from coral_core.volume import load_frames, save_volume

    rng = np.random.default_rng(0)
    image = (rng.random((6, 24, 20)) * 400).astype(np.float32)
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    folder.mkdir()
    seeds = {}
    for fmt in ("nii", "nii.gz", "mha", "nrrd"):
        seeds[fmt] = save_volume(folder / f"seed.{fmt}", image, affine)
    series = write_dicom_series(folder / "series", image.astype(np.int16))
    seeds["dicom"] = series
    like = load_frames(series)[0]
    labels = np.zeros(like.shape, np.uint8)
    labels[1:5, 4:14, 3:12] = 1
    labels[2:4, 8:20, 10:18] = 2
    seeds["seg"] = save_dicom_seg(folder / "seed_seg.dcm", labels, like, ["background", "Liver", "Heart"])
    seeds["rtstruct"] = save_rt_structure_set(folder / "seed_rt.dcm", labels, like, ["background", "Liver", "Heart"])
    model = UNet(UNetConfig(n_classes=3, base_filters=4, depth=2, embedding_dim=8, image_size=32,
                                class_names=["background", "Liver", "Heart"]))
    seeds["checkpoint"] = save_checkpoint(folder / "seed.safetensors", model, {"method": "coral"})
    cine = np.stack([np.roll(image[:4], t, axis=1) for t in range(3)])  # (t, z, y, x): 3 phases of 4 slices
    seeds["nii-cine"] = save_volume(folder / "seed-cine.nii", cine, affine)
    seeds["dicom-cine"] = write_dicom_series(folder / "cine", cine.astype(np.int16))
    seeds["enhanced"] = write_enhanced_dicom(folder / "enhanced.dcm", cine.astype(np.int16), affine)
    return seeds


def _header_size(fmt: str, data: bytes) -> int:
    if fmt in ("mha", "nrrd"):
        end = data.find(b"ElementDataFile = LOCAL\n") if fmt == "mha" else data.find(b"\n\n")
        return max(16, end + 24 if fmt == "mha" else end + 2)
    if fmt == "checkpoint":
        return 8 + int.from_bytes(data[:8], "little")
    return min(len(data), 352 if fmt.startswith("nii") else 2048)


def _mutate_text_header(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    head_end = _header_size(fmt, data)
    lines = data[:head_end].split(b"\n")
    candidates = [i for i, line in enumerate(lines) if (b"=" in line if fmt == "mha" else b":" in line)
                  and not line.startswith(b"ElementDataFile") and not line.startswith(b"data file")]
    i = rng.choice(candidates)
    sep = b" = " if fmt == "mha" else b": "
    key, _, value = lines[i].partition(sep)
    words = value.split(b" ")
    words[rng.randrange(len(words))] = rng.choice(TEXT_VALUES).encode()
    lines[i] = key + sep + b" ".join(words)
    return b"\n".join(lines) + data[head_end:], f"header {lines[i].decode()!r}"


def _mutate_bytes(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    head = _header_size(fmt, data)
    kind = rng.choice(("cut", "flip", "field", "text") if fmt in ("mha", "nrrd") else ("cut", "flip", "field"))
    buf = bytearray(data)
    if kind == "cut":
        return bytes(buf[: rng.randrange(len(buf))]), "cut"
    if kind == "text":
        return _mutate_text_header(data, rng, fmt)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(head) if rng.random() < 0.8 else rng.randrange(len(buf))
            buf[at] = rng.randrange(256)
        return bytes(buf), "bytes"
    width = rng.choice((2, 4, 8))
    at = rng.randrange(max(1, head - width))
    value = rng.choice(EXTREMES) % (1 << (8 * width))
    buf[at: at + width] = value.to_bytes(width, "little")
    return bytes(buf), "field"


SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
             b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
BINARY_VRS = {b"AT": 4, b"FL": 4, b"FD": 8, b"SL": 4, b"SS": 2, b"UL": 4, b"US": 2}
DICOM_TEXT = (b"0", b"-1", b"1e30", b"nan", b"", b"abc", b"0\\0\\0", b"1\\0\\0\\0\\0\\0", b"99999999", b"1\\2")


def _dicom_elements(data: bytes) -> list[tuple[int, int, bytes, int]]:
    """(offset, tag, VR, value length) of the header's strings and numbers: all of an explicit-VR little-endian file's
    (sequences' items included: a tag, a VR with a 2-byte length that ends where another element starts), the top level
    of an implicit-VR file's (as GDCM writes a series)."""
    import io
    import re

    from pydicom.filereader import data_element_generator, read_preamble

    from pydicom.datadict import dictionary_VR

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # past (0002,0000) and the group it measures
    if b"1.2.840.10008.1.2\x00" in data[132:meta_end]:  # implicit VR
        fp.seek(meta_end)
        out = []
        for raw in data_element_generator(fp, True, True):
            try:
                vr = dictionary_VR(raw.tag).encode()
            except KeyError:
                continue
            if vr in SHORT_VRS and raw.tag >> 16 != 0x7FE0:
                out.append((raw.value_tell - 8, int(raw.tag), vr, raw.length))
        return out
    found = []
    for m in re.finditer(rb"(?s)(?=(....)([A-Z]{2})(..))", data[meta_end:]):
        tag = int.from_bytes(m.group(1)[:2], "little") << 16 | int.from_bytes(m.group(1)[2:], "little")
        if m.group(2) in SHORT_VRS and tag >> 16 != 0x7FE0:
            found.append((meta_end + m.start(), tag, m.group(2), int.from_bytes(m.group(3), "little")))
    starts = {at for at, *_ in found}
    return [e for e in found if e[0] + 8 + e[3] in starts | {len(data)} or data[e[0] + 8 + e[3]:][:2] == b"\xfe\xff"]


def _mutate_dicom_element(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A data element of the header (a string or a number) given another value or removed, in the file's bytes, as a
    damaged or careless writer leaves it."""
    at, tag, vr, length = rng.choice(_dicom_elements(data))
    head = 8  # a tag and either a VR with a 2-byte length or (implicit VR) a 4-byte length
    end = at + head + length
    name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    if rng.random() < 0.25:
        return data[:at] + data[end:], f"removed {name}"
    if vr in BINARY_VRS:
        width = BINARY_VRS[vr]
        value = rng.choice(EXTREMES) % (1 << (8 * width))
        new = value.to_bytes(width, "little") * rng.choice((1, 1, 1, 0, 2))
    else:
        new = rng.choice(DICOM_TEXT)
        new += b" " * (len(new) % 2)
    explicit = data[at + 4: at + 6] == vr
    header = data[at: at + 6] + len(new).to_bytes(2, "little") if explicit else data[at: at + 4] + len(new).to_bytes(
        4, "little")
    return data[:at] + header + new + data[end:], f"{name} {vr.decode()} = {new[:20]!r}"


def _mutate_checkpoint_meta(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    meta = header.get("__metadata__", {})
    key = rng.choice(sorted(meta))
    inner = None
    try:
        inner = json.loads(meta[key])
    except ValueError:
        pass
    if isinstance(inner, dict) and inner:
        where, what = inner, f"metadata {key}"
        while True:  # a field, or a field of a field
            sub = rng.choice(sorted(where))
            what += f".{sub}"
            if not (isinstance(where[sub], dict) and where[sub] and rng.random() < 0.5):
                break
            where = where[sub]
        where[sub] = rng.choice((None, -1, 0, 1e30, "x", [], {}, [1, 2], {"x": 1}))
        meta[key] = json.dumps(inner)
    elif rng.random() < 0.5:
        meta[key] = rng.choice(("", "{", "null", "[]", "-1", "x" * 10))
        what = f"metadata {key}"
    else:
        tensor = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(("shape", "dtype", "data_offsets"))
        header[tensor][field] = rng.choice(([], [0], [1, 2], [-1, 5], "F64", "Q9", [2**40]))
        what = f"tensor {tensor} {field}"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:], what


def damage(fmt: str, seed: Path, work: Path, case: int) -> tuple[Path, str]:
    """A damaged copy of ``seed`` in ``work`` under a name of its own (the readers cache by name and time)."""
    rng = random.Random(f"{fmt}:{case}")
    if fmt in ("dicom", "dicom-cine"):
        target = work / f"series{case}"
        shutil.copytree(seed, target)
        files = sorted(target.iterdir())
        f = files[len(files) // 2]
        if rng.random() < 0.5:
            data, what = _mutate_dicom_element(f.read_bytes(), rng)
        else:
            data, what = _mutate_bytes(f.read_bytes(), rng, "dicom")
        f.write_bytes(data)
        return target, what
    suffix = {"seg": ".dcm", "rtstruct": ".dcm", "enhanced": ".dcm", "checkpoint": ".safetensors",
              "nii-cine": ".nii"}.get(fmt, "." + fmt)
    target = work / f"case{case}{suffix}"
    data = seed.read_bytes()
    if fmt in ("seg", "rtstruct", "enhanced") and rng.random() < 0.5:
        data, what = _mutate_dicom_element(data, rng)
    elif fmt == "checkpoint" and rng.random() < 0.4:
        data, what = _mutate_checkpoint_meta(data, rng)
    elif fmt == "nii.gz" and rng.random() < 0.5:
        data, what = _mutate_bytes(gzip.decompress(data), rng, "nii")
        data, what = gzip.compress(data, mtime=0), what + " (inside gzip)"
    else:
        data, what = _mutate_bytes(data, rng, fmt)
    target.write_bytes(data)
    return target, what


def read(fmt: str, path: Path, seeds: dict[str, Path]) -> None:
    """What the CLI and napari's reader call on such a file: the header-only looks first (which must not raise),
    then the read."""
    from coral_core.checkpoint import describe_checkpoint, load_checkpoint
    from coral_core.dicomlabels import referenced_series
    from coral_core.errors import UserError
    from coral_core.volume import frame_count, load_frames, load_labels_like, read_class_names

    if fmt == "checkpoint":
        try:
            describe_checkpoint(path)
        except UserError:  # then the load must refuse it too
            pass
        load_checkpoint(path)
        return
    frame_count(path)
    read_class_names(path)
    if fmt in ("seg", "rtstruct"):
        referenced_series(path)
        load_labels_like(path, load_frames(seeds["dicom"])[0])
        return
    from coral_core.infer import segment_volume
    from coral_core.volume import save_like

    for t, volume in enumerate(load_frames(path)):  # then segmented, as read, and the labels saved beside it
        for model in MODELS:
            labels = segment_volume(model, volume.array, spacing=volume.spacing)
        save_like(path.parent / f"{path.name}-labels{t}.nii.gz", labels, volume, list(model.config.class_names))


def run_case(fmt: str, path: Path, seeds: dict, timeout: float, memory_gib: float, out: Path) -> dict:
    """Read ``path`` in a forked child; what happened, as a dict."""
    def quiet() -> None:  # the readers' own complaints (ITK, GDCM) go nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)

    def work() -> dict:
        from coral_core.errors import UserError

        warnings.simplefilter("ignore")
        try:
            read(fmt, path, seeds)
        except UserError as exc:
            return {"outcome": "refused", "message": str(exc)}
        return {"outcome": "read"}

    return run_forked(work, out, timeout, memory_gib, prepare=quiet)


DEFECTS = ("exception", "out of memory", "killed", "timed out")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="damaged copies per format")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per read")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="address space a read may add")
    parser.add_argument("--show", type=int, default=3, help="defects of each kind printed per format")
    parser.add_argument("--only", default=None, help="FORMAT:CASE, one case, its outcome printed in full")
    args = parser.parse_args()
    formats = [args.only.split(":")[0]] if args.only else args.formats.split(",")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    import importlib

    for module in ("coral_core.volume", "coral_core.dicomlabels", "coral_core.checkpoint", "pydicom", "SimpleITK",
                   "nibabel"):  # imported once, before the forks
        importlib.import_module(module)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = make_seeds(tmp / "seeds")
        make_models()
        for fmt in formats:  # the seeds themselves must read
            result = run_case(fmt, seeds[fmt], seeds, args.timeout, args.memory_gib, tmp / f"seed-{fmt}.json")
            if result["outcome"] != "read":
                print(f"the valid {fmt} seed did not read: {result}", file=sys.stderr)
                return 1
        rows, shown, failed = [], [], False
        started = time.perf_counter()
        for fmt in formats:
            counts = dict.fromkeys(("read", "refused", *DEFECTS), 0)
            cases = [int(args.only.split(":")[1])] if args.only else range(args.cases)
            work = tmp / fmt
            work.mkdir()
            for case in cases:
                path, what = damage(fmt, seeds[fmt], work, case)
                result = run_case(fmt, path, seeds, args.timeout, args.memory_gib, work / f"{case}.json")
                counts[result["outcome"]] += 1
                if args.only or (result["outcome"] in DEFECTS
                                 and sum(1 for s in shown if s[0] == fmt and s[2] == result["outcome"]) < args.show):
                    shown.append((fmt, case, result["outcome"], what, result.get("message", ""),
                                  result.get("where", "")))
            failed |= any(counts[d] for d in DEFECTS)
            rows.append((fmt, len(cases), counts))
        seconds = time.perf_counter() - started
    print(f"Damaged files read as the CLI and the plugin read them ({seconds:.0f} s)\n")
    header = f"{'format':<11} {'cases':>5} {'read':>5} {'refused':>7} " + " ".join(f"{d:>13}" for d in DEFECTS)
    print(header)
    print("-" * len(header))
    for fmt, n, counts in rows:
        print(f"{fmt:<11} {n:>5} {counts['read']:>5} {counts['refused']:>7} "
              + " ".join(f"{counts[d]:>13}" for d in DEFECTS))
    for fmt, case, outcome, what, message, where in shown:
        print(f"\n{fmt}:{case} ({what}): {outcome}" + (f" at {where}" if where else "") + f"\n    {message}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
