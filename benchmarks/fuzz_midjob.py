"""What a user does while a panel's job runs, in a real napari viewer: does every panel come back, say what happened
in one sentence, and keep what the user made?

Each case presses one job (Segment; Embed; Fine-tune, 40 steps in its training process as the panel starts it, then
its re-segmenting; Pretrain, 2 epochs) on a plain scan "scan" (160 x 128 x 128) with a Labels layer "scan labels"
painted on slice 1, and while it runs (Segment and Embed: as soon as their worker has started; Fine-tune and
Pretrain: after their first training step is reported) does one thing a user may do then: nothing; remove the
scan; rename it; give it other data (another shape); paint slice 3 of "scan labels"; remove "scan labels"; load
another model; click the job's button again; click every other panel's button (as a user clicks: a greyed-out
button does nothing); close the job's panel; remove every layer. Then it waits for the job (and whatever the action started) to end. A case ends as

* ``ok``: the panel's button is back (or the panel is closed), its status is one sentence, and no layer of the
  user's lost what it held (the scan's voxels; "scan labels"' painted slices, slice 3 too once painted), or
* a defect: an exception (a press, a worker, a Qt slot, napari's notification), a status that is not one sentence,
  ``stuck`` (the job or the panel never came back: its button stays greyed out or its status says it is still
  working), ``user's layer lost``, ``wrong result`` (labels of another shape than the scan they are named for, a
  result added for a scan no longer open, Segment's status naming a model loaded since as the one that segmented).

Each case runs in its own process, under the caller's display:

    xvfb-run -a python benchmarks/fuzz_midjob.py [--cases JOB:ACTION,...] [--show] [--timeout S]

``--show`` prints each case's last status line. Exit 1 when there is a defect.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_layers as fl  # noqa: E402  - its pump, press and message checks

JOBS = ("segment", "embed", "finetune", "pretrain")
ACTIONS = ("nothing", "remove the scan", "rename the scan", "replace the scan's data", "paint a slice",
           "remove the labels", "load another model", "press again", "press the other panels", "close the panel",
           "remove every layer")
SHAPE = (160, 128, 128)
WORKING = ("Segmenting", "Embedding slices", "Fine-tuned. Loading", "Starting pretraining", "step ", "Cancelling",
           "Annotations go to")


def _scan(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.linspace(0, 1, shape[0])[:, None, None]
    return (rng.random(shape) * 0.3 + z).astype(np.float32)


def _painted() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 30:90, 30:90] = 1
    labels[1, 50:70, 50:70] = 2
    return labels


def run_case(job: str, action: str, timeout: float, home: Path) -> dict:
    os.environ["NAPARI_CORAL_HOME"] = str(home)
    import napari
    from qtpy.QtWidgets import QApplication

    from coral_core.model import UNetConfig, build_model
    from napari_coral._session import session_for
    from napari_coral._widgets._common import alive

    viewer = napari.Viewer(show=False)
    pump = fl._Pump(QApplication.instance())
    config = UNetConfig(base_filters=16, depth=3, image_size=128, n_classes=3, class_names=["background", "c1", "c2"])
    session = session_for(viewer)
    session.set_model(build_model(config), {"training": {}}, "tiny test model")
    scan = viewer.add_image(_scan(), name="scan")
    voxels = np.array(scan.data, copy=True)
    labels = viewer.add_labels(_painted(), name="scan labels")
    must_keep = {1: _painted()[1].copy()}  # slice -> what it must still hold

    def dock(panel):
        return viewer.window.add_plugin_dock_widget("napari-coral", panel)
    docks = {p: dock(p) for p in ("Segment", "Embedding", "Fine-tune", "Model")}
    segment, embedding, finetune, model_panel = (docks[p][1] for p in ("Segment", "Embedding", "Fine-tune", "Model"))
    for w in (segment, embedding, finetune, model_panel):
        w.device_picker.setCurrentText("cpu")
    finetune.steps.setValue(40)
    model_panel.epochs.setValue(2)
    segment.image_picker.setCurrentText("scan")
    finetune.image_picker.setCurrentText("scan")
    finetune.labels_picker.setCurrentText("scan labels")
    panels = {"segment": segment, "embed": embedding, "finetune": finetune, "pretrain": model_panel}
    panel = panels[job]
    panel_name = {"segment": "Segment", "embed": "Embedding", "finetune": "Fine-tune", "pretrain": "Model"}[job]
    presses = {"segment": segment.segment, "embed": embedding.embed, "finetune": finetune.finetune,
               "pretrain": model_panel.pretrain}
    buttons = {"segment": segment.segment_button, "embed": embedding.embed_button,
               "finetune": finetune.finetune_button, "pretrain": model_panel.pretrain_button}
    statuses = {"segment": segment.status, "embed": embedding.status, "finetune": finetune.status,
                "pretrain": model_panel.pretrain_status}
    ended = {"flag": True}  # the job's napari worker (Segment, Embed); the runners are asked in all_done

    def resegmenting_done():  # Fine-tune's re-segmenting worker, once its model is loaded
        w = getattr(finetune, "segment_worker", None)
        return w is None or not w.is_running

    def all_done() -> bool:
        runners = [w for w in (finetune.runner, model_panel.runner) if w is not None]
        return (ended["flag"] and not any(r.running for r in runners) and resegmenting_done()
                and all(_panel_settled(name) for name in panels))

    def _panel_settled(name) -> bool:
        if not alive(panels[name]):
            return True
        text = statuses[name].text()
        return buttons[name].isEnabled() and not any(text.startswith(s) for s in WORKING)

    before = len(pump.exceptions)
    try:
        started = presses[job]()
    except Exception as exc:
        return {"outcome": "exception", "message": f"the press: {type(exc).__name__}: {exc}"}
    if started is None:
        return {"outcome": "refused", "message": statuses[job].text()}
    if job in ("segment", "embed"):
        ended["flag"] = False
        started.finished.connect(lambda *_: ended.__setitem__("flag", True))
    if job == "finetune":
        pump.until(lambda: finetune.losses or not finetune.runner.running, 3 * timeout)
    elif job == "pretrain":
        pump.until(lambda: model_panel.pretrain_status.text().startswith("step ") or not model_panel.runner.running,
                   3 * timeout)
    else:  # no more of Qt's events than it takes the worker to start: the job must still be running
        end = time.monotonic() + 5
        while not started.is_running and time.monotonic() < end:
            pump.app.processEvents()
            time.sleep(0.005)
    mid_job = not all_done()
    other_model = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=3,
                                         class_names=["background", "x1", "x2"]))
    try:
        if action == "remove the scan":
            viewer.layers.remove(scan)
        elif action == "rename the scan":
            scan.name = "renamed scan"
        elif action == "replace the scan's data":
            scan.data = _scan((30, 64, 64), seed=5)
        elif action == "paint a slice":
            data = np.asarray(labels.data)
            data[3, 40:80, 40:80] = 2
            labels.data = data  # as a paint stroke ends: the layer's data changed
            must_keep[3] = data[3].copy()
        elif action == "remove the labels":
            viewer.layers.remove(labels)
        elif action == "load another model":
            session.set_model(other_model, {"training": {}}, "another model")
        elif action == "press again":  # clicked as a user clicks: a greyed-out button does nothing
            buttons[job].click()
        elif action == "press the other panels":
            for other in presses:
                if other != job:
                    buttons[other].click()
        elif action == "close the panel":
            viewer.window.remove_dock_widget(docks[panel_name][0])
        elif action == "remove every layer":
            viewer.layers.clear()
    except Exception as exc:
        return {"outcome": "exception", "message": f"the action: {type(exc).__name__}: {exc}"}
    settled = pump.until(all_done, 4 * timeout)
    for _ in range(50):  # what the ends' handlers queue
        pump.app.processEvents()
        time.sleep(0.01)
    status = statuses[job].text() if alive(panel) else "(panel closed)"
    result = {"mid_job": mid_job, "status": status, "layers": [f"{type(la).__name__} {la.name!r}" for la in viewer.layers]}
    caught = pump.exceptions[before:]
    if caught:
        return result | fl._exception_outcome(caught[0]) | {"outcome": "exception"}
    if not settled:
        stuck = [name for name in panels if not _panel_settled(name)]
        return result | {"outcome": "stuck", "message": f"panels not back: {stuck}; status {status!r}"}
    for name, w in panels.items():
        text = statuses[name].text() if alive(w) else ""
        problem = text and fl._one_sentence_problem(text)
        if problem and not text.startswith(("Choose", "Paint")):
            return result | {"outcome": "bad message", "message": f"{name}: {problem}: {text!r}"}
    if job == "segment" and action == "load another model" and "(another model)" in status:
        return result | {"outcome": "wrong result", "message": "the status names the model loaded since as the one "
                                                               f"that segmented: {status!r}"}
    if scan in viewer.layers and action != "replace the scan's data" and not np.array_equal(scan.data, voxels):
        return result | {"outcome": "user's layer lost", "message": "the scan's voxels changed"}
    if labels in viewer.layers:
        now = np.asarray(labels.data)
        lost = [k for k, v in must_keep.items() if now.shape != SHAPE or not np.array_equal(now[k], v)]
        if lost:
            return result | {"outcome": "user's layer lost", "message": f"'scan labels' slices {lost} changed"}
    for layer in viewer.layers:
        if type(layer).__name__ != "Labels" or layer is labels:
            continue
        owner = [s for s in viewer.layers if type(s).__name__ == "Image" and layer.name.startswith(f"{s.name} labels")]
        if not owner:
            return result | {"outcome": "wrong result", "message": f"{layer.name!r} added for no open scan"}
        if tuple(layer.data.shape) != tuple(owner[0].data.shape):
            return result | {"outcome": "wrong result", "message": f"{layer.name!r} of shape {layer.data.shape} for "
                                                                   f"{owner[0].name!r} of {owner[0].data.shape}"}
    if labels in viewer.layers and scan in viewer.layers and tuple(labels.data.shape) != tuple(scan.data.shape) \
            and action != "replace the scan's data":
        return result | {"outcome": "wrong result", "message": "'scan labels' changed shape"}
    return result | {"outcome": "ok"}


DEFECTS = {"exception", "bad message", "stuck", "user's layer lost", "wrong result", "crashed", "timed out"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated JOB:ACTION pairs (default: every job with every action)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a job may take (the wait: 4x)")
    parser.add_argument("--show", action="store_true", help="print each case's last status and its layers")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "ACTION"), help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        try:
            result = run_case(*args.child, args.timeout, Path(args.home))
        except Exception as exc:
            import traceback

            sys.__excepthook__(type(exc), exc, exc.__traceback__)
            result = {"outcome": "crashed",
                      "message": "".join(traceback.format_exception_only(exc)).strip()[:300]}
        print("@fuzz " + json.dumps(result), flush=True)
        os._exit(0)  # leave without Qt's teardown
    cases = [(j, a) for j in JOBS for a in ACTIONS]
    if args.cases:
        wanted = [tuple(c.strip().split(":", 1)) for c in args.cases.split(",")]
        unknown = [w for w in wanted if w not in cases]
        if unknown:
            parser.error(f"unknown cases: {unknown}")
        cases = wanted
    started, rows = time.monotonic(), []
    for job, action in cases:
        with tempfile.TemporaryDirectory(prefix="fuzz-midjob-home-") as home:
            t0 = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", job, action, "--home", home,
                                       "--timeout", str(args.timeout)], capture_output=True, text=True,
                                      timeout=10 * args.timeout + 120)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@fuzz ")]
                result = json.loads(lines[-1][6:]) if lines else {
                    "outcome": "crashed", "message": f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                result = {"outcome": "timed out", "message": "the case's process"}
        seconds = time.monotonic() - t0
        rows.append((job, action, result, seconds))
        mid = "" if result.get("mid_job", True) else " (the job had ended before the action)"
        print(f"{job:<9} {action:<24} {result['outcome']:<18} {seconds:5.1f} s{mid}", flush=True)
        if args.show:
            print(f"    status: {result.get('status', '')!r}\n    layers: {result.get('layers', '')}")
            if result.get("message"):
                print(f"    {result['message'][:400]}")
    print()
    print("| job | " + " | ".join(ACTIONS) + " |")
    print("|---|" + "---|" * len(ACTIONS))
    for job in JOBS:
        cells = {a: r["outcome"] + ("" if r.get("mid_job", True) else " (after)") for j, a, r, _ in rows if j == job}
        if cells:
            print(f"| {job} | " + " | ".join(cells.get(a, "-") for a in ACTIONS) + " |")
    defects = [(j, a, r) for j, a, r, _ in rows if r["outcome"] in DEFECTS]
    not_mid = sum(1 for _, _, r, _ in rows if not r.get("mid_job", True))
    print(f"\n{len(rows)} cases ({not_mid} whose job had ended before the action), "
          f"{time.monotonic() - started:.0f} s; defects: {len(defects)}")
    for job, action, r in defects:
        where = f" [{r['where']}]" if r.get("where") else ""
        print(f"  {job} / {action}: {r['outcome']}: {r.get('message', '')[:300]}{where}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
