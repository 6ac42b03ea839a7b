"""Model dock widget: the bundled demo model, a checkpoint from disk, or CORAL pretraining."""

from __future__ import annotations

import tempfile
from pathlib import Path

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from coral_core.checkpoint import load_checkpoint
from coral_core.errors import UserError
from coral_core.pretrain import METHODS, PretrainConfig, budget_advice, pretraining_steps
from napari_coral._jobs import Job, config_dict, resume_folder, stopped_runs
from napari_coral._layers import LayerArray, extent_mm
from napari_coral._session import MODELS_REMEMBERED, data_home, keep_model_sentence, session_for
from napari_coral._widgets._common import (
    DevicePicker, JobRunner, VolumeChecklist, any_job_running, ask_model_path, drop_job_files, on_job_events,
    no_volume_text, save_model_as, status_label,
)


class ModelWidget(QWidget):
    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.current = status_label()

        self.demo_button = QPushButton("Use demo model")
        self.load_button = QPushButton("Load checkpoint...")
        self.save_button = QPushButton("Save model")
        self.demo_button.clicked.connect(self.use_demo_model)
        self.load_button.clicked.connect(self._ask_load)
        self.save_button.clicked.connect(self._ask_save)
        buttons = QHBoxLayout()
        for b in (self.demo_button, self.load_button, self.save_button):
            buttons.addWidget(b)
        self.previous_button = QPushButton("Previous model")
        self.previous_button.clicked.connect(self.use_previous_model)
        back = QHBoxLayout()
        back.addWidget(self.previous_button)
        back.addStretch(1)

        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.epochs.setValue(3)
        self.volumes = VolumeChecklist(napari_viewer, cine=True)
        self.physical_scale = QCheckBox("In millimetres")
        self.physical_scale.setToolTip(
            "Pretrain a model with a physical scale: it sees the same square of millimetres of every scan (the widest "
            "checked image's field of view), read with each layer's scale as its spacing, so anatomy keeps its size "
            "in its pixels (docs/results.md, 'Field of view'). A current model with a scale passes its own on."
        )
        self.device_picker = DevicePicker()
        self.pretrain_button = QPushButton("Pretrain")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.pretrain_button.clicked.connect(lambda: self.pretrain())  # not clicked's `checked` (False) as its mode
        self.cancel_button.clicked.connect(self.cancel)
        self.pretrain_status = status_label("Self-supervised: no labels needed. Uses the checked image layers (each frame of "
                                             "a cine series).")
        form = QFormLayout()
        form.addRow("Method", self.method)
        form.addRow("Epochs", self.epochs)
        self.budget = status_label()  # the steps those epochs make of the checked images
        form.addRow("", self.budget)
        form.addRow("Device", self.device_picker)
        form.addRow("Volumes", self.volumes)
        form.addRow("", self.physical_scale)
        row = QHBoxLayout()
        row.addWidget(self.pretrain_button)
        row.addWidget(self.cancel_button)
        group = QGroupBox("Pretrain on open images")
        group_layout = QVBoxLayout(group)
        group_layout.addLayout(form)
        group_layout.addLayout(row)
        group_layout.addWidget(self.pretrain_status)
        self.stopped_runs = status_label()
        self.discard_button = QPushButton("Discard stopped runs")
        self.discard_button.clicked.connect(self.discard_stopped_runs)
        group_layout.addWidget(self.stopped_runs)
        group_layout.addWidget(self.discard_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.current)
        layout.addLayout(buttons)
        layout.addLayout(back)
        layout.addWidget(group)
        layout.addStretch(1)

        self.epochs.valueChanged.connect(self._show_budget)
        self.volumes.changed.connect(self._show_budget)
        self._show_budget()

        self.runner: JobRunner | None = None
        self._tmp = None
        self.session.subscribe(self._show_model)
        self._show_model()
        self._show_stopped_runs()
        on_job_events(self, "_show_stopped_runs")  # a job of any dock starts or ends: its file comes or goes

    # ------------------------------------------------------------------ model source
    def _show_model(self) -> None:
        from coral_core.checkpoint import training_summary

        text = f"Current model: {self.session.describe()}"
        if self.session.model is not None:  # how it was made, as `coral info` says it
            text += f"\nTrained: {training_summary(self.session.meta.get('training') or {})}."
        self.current.setText(text)
        history = self.session.history
        self.previous_button.setEnabled(bool(history))
        self.previous_button.setToolTip(
            f"Back to the model used before this one: {history[-1][2]} ({len(history)} earlier model"
            f"{'' if len(history) == 1 else 's'} kept in memory, the last {MODELS_REMEMBERED})" if history
            else "Back to the model used before this one (none yet)")

    def use_demo_model(self) -> None:
        self.session.use_bundled_model()

    def use_previous_model(self) -> bool:
        """Back to the model the current one replaced (a fine-tuning that did worse, a checkpoint loaded by mistake);
        pressed again, to the one before it."""
        return self.session.previous_model()

    def load_checkpoint_file(self, path: str) -> bool:
        from napari.utils.notifications import show_error

        try:
            model, meta = load_checkpoint(path)
        except UserError as exc:
            show_error(str(exc))
            return False
        self.session.set_model(model, meta, Path(path).name)
        return True

    def save_model_file(self, path: str) -> Path | None:
        return save_model_as(self.session, path)

    def _ask_load(self) -> None:
        kept = data_home() / "models"  # where the plugin keeps the models it trained
        path, _ = QFileDialog.getOpenFileName(self, "Load a napari-coral model", str(kept) if kept.is_dir() else "",
                                              "Models (*.safetensors *.pth)")
        if path:
            self.load_checkpoint_file(path)

    def _ask_save(self) -> None:
        path = ask_model_path(self, "coral-model.safetensors")
        if path:
            self.save_model_file(path)

    # ------------------------------------------------------------------ pretraining
    def _show_budget(self, *_) -> None:
        """How many steps the epochs make of the checked images, and how many epochs reach the steps
        CORAL's pretraining needed on phantoms."""
        slices = self.volumes.checked_slices()
        if not slices:
            self.budget.setText("")
            return
        batch = PretrainConfig.batch_size
        steps = pretraining_steps(slices, batch, self.epochs.value())
        advice = budget_advice(slices, batch, self.epochs.value(), option="Epochs")
        text = f"{steps} step{'' if steps == 1 else 's'} of {min(batch, slices)} slices ({slices} checked)"
        self.budget.setText(f"{text}: a quick look; {advice}." if advice else f"{text}.")

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._show_stopped_runs()  # files may have come or gone while the dock was hidden
        super().showEvent(event)

    def _show_stopped_runs(self) -> None:
        """Say how many stopped runs' progress files (pretraining and fine-tuning) are kept, and offer
        to discard them."""
        files = stopped_runs()
        running = any_job_running()
        if files:
            megabytes = sum(f.stat().st_size for f in files if f.exists()) / 1e6
            self.stopped_runs.setText(
                f"{len(files)} stopped training run(s) kept ({megabytes:.1f} MB in {files[0].parent}): training "
                "again on the same inputs with the same settings continues one.")
        self.stopped_runs.setVisible(bool(files))
        self.discard_button.setVisible(bool(files))
        self.discard_button.setEnabled(bool(files) and not running)  # a running job may be writing its file

    def discard_stopped_runs(self) -> int:
        """Delete the progress files of stopped training runs; returns how many went."""
        if any_job_running():
            self.stopped_runs.setText("A training job is running; discard the stopped runs once it is done.")
            return 0
        files = stopped_runs()
        for f in files:
            f.unlink(missing_ok=True)
        self._show_stopped_runs()
        return len(files)

    def pretrain(self, mode: str = "process"):
        from napari.utils.notifications import show_error

        if self.runner is not None and self.runner.running:  # called again while it runs: it would take its folder
            return None
        names = self.volumes.checked()
        if not names:
            message = no_volume_text(self.viewer, "Check at least one open 3-D image to pretrain on.")
            self.pretrain_status.setText(message)
            show_error(message)
            return None
        device = self.device_picker.device_or_none(self.pretrain_status)
        if device is None:
            return None
        base = self.session.ensure_model().config
        if self.physical_scale.isChecked() and base.pixel_spacing is None:
            from dataclasses import replace

            # the widest checked image's field of view fills the input
            widest = max(extent_mm(self.viewer.layers[n]) for n in names)
            base = replace(base, pixel_spacing=widest / base.image_size)
        cfg = PretrainConfig(method=self.method.currentText(), epochs=self.epochs.value(), device=device.type, model=base)
        self._tmp = tempfile.TemporaryDirectory(prefix="napari-coral-")
        folder = Path(self._tmp.name)
        # read by the job's thread, not here: a lazy layer is read from disk then
        volumes = {f"v{i:04d}": LayerArray(self.viewer.layers[n]) for i, n in enumerate(names)}
        spec = {
            "out": str(folder / "pretrained.safetensors"), "config": config_dict(cfg),
            "training": {"stage": "pretrain", "method": cfg.method, "epochs": cfg.epochs, "volumes": names},
            "resume_folder": str(resume_folder()),  # the job names its file there from a hash of images and settings
        }
        if base.pixel_spacing is not None:  # the new model keeps the scale: the job cuts its square from each
            spec["spacings"] = {key: reader.spacing for key, reader in volumes.items()}
        self._continued_from = None
        self.runner = JobRunner(Job("pretrain", spec, mode, inputs=(folder, volumes)), f"Pretraining ({cfg.method})", self)
        self.runner.progressed.connect(self._progress)
        self.runner.finished.connect(self._pretrained)
        self.runner.failed.connect(self._failed)
        self.pretrain_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.pretrain_status.setText("Starting pretraining...")
        return self.runner.start()

    def _progress(self, step: int, total: int, metrics: dict) -> None:
        if self._continued_from is None:  # the first report: a job that continues starts past step 1
            self._continued_from = step - 1
        note = f" (continued from step {self._continued_from})" if self._continued_from else ""
        self.pretrain_status.setText(f"step {step}/{total}, loss {metrics.get('loss', float('nan')):.3f}{note}")

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            self.pretrain_status.setText("Cancelling after the current step...")

    def _pretrained(self, path: str, stopped: bool) -> None:
        self.pretrain_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if stopped:
            drop_job_files(self)
            self.pretrain_status.setText("Pretraining cancelled; the previous model is kept. Pretrain the same images "
                                         "with the same settings to continue where it stopped.")
            return
        model, meta = load_checkpoint(path)
        method = meta["training"].get("method", "")
        self.session.set_model(model, meta, f"{method}-pretrained encoder")
        self.pretrain_status.setText(f"Pretraining finished. Paint a few slices and fine-tune (name your classes "
                                     f"under Classes in the Fine-tune panel). "
                                     f"{keep_model_sentence(path, 'pretrained', method)}")
        drop_job_files(self)  # read and kept: the job's files can go

    def _failed(self, message: str) -> None:
        from napari.utils.notifications import show_error

        drop_job_files(self)
        self.pretrain_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.pretrain_status.setText(message)
        show_error(message)
