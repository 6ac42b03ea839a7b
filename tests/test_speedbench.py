"""The speed benchmark measures what it says, on a tiny configuration (figures come from benchmarks/)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from coral_core.model import UNetConfig, build_model
from coral_core.speedbench import SpeedConfig, format_speed_table, model_flops, peak_flops, run_speed


def test_training_flops_are_forward_plus_backward_of_the_embedder():
    cfg = UNetConfig(base_filters=4, depth=2, image_size=32, embedding_dim=16)
    model = build_model(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.embed(torch.zeros(1, 1, 32, 32))
    forward = counter.get_total_flops()
    # backward costs about twice the forward (input and weight gradients of every layer)
    assert 2.5 * forward < model_flops(cfg, training=True) <= 3 * forward
    assert model_flops(cfg, training=False) > forward  # the decoder adds to the encoder


def test_peak_is_known_only_where_it_is_published():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.0) == 2e12


def test_run_measures_every_task_for_ours_and_the_baseline():
    cfg = SpeedConfig(image_size=32, base_filters=4, pretrain_batch=4, pretrain_steps=2, warmup_steps=1,
                      infer_sizes=(32, 48), infer_slices=4, infer_batch=2, repeats=1, finetune_steps=3,
                      finetune_batch=2, finetune_size=32, finetune_base_filters=4, device="cpu")
    result = run_speed(cfg)
    tasks = [(r["task"], r["size"], r["unit"]) for r in result["rows"]]
    assert tasks == [("pretrain", 32, "slices/s"), ("inference", 32, "slices/s"), ("segment volume", 32, "s"),
                     ("inference", 48, "slices/s"), ("segment volume", 48, "s"), ("fine-tune 3 steps", 32, "s"),
                     ("fine-tune, CORAL model", 32, "s")]
    assert result["rows"][-1]["ours"] > 0 and result["rows"][-1]["baseline"] is None  # ours only
    for r in result["rows"][:-1]:
        assert r["ours"] > 0 and r["baseline"] > 0
        ratio = r["ours"] / r["baseline"] if r["unit"] == "slices/s" else r["baseline"] / r["ours"]
        assert r["speedup"] == pytest.approx(ratio)
    inference = result["rows"][1]
    assert inference["ours"] == pytest.approx(4 / result["rows"][2]["ours"])  # slices/s from the volume time
    assert inference["tflops"] == pytest.approx(inference["ours"] * model_flops(
        UNetConfig(base_filters=4, image_size=32, n_classes=4), training=False) / 1e12)
    assert inference["mfu"] is None  # no published peak for a CPU
    text = format_speed_table(result)
    assert "pretrain" in text and "fine-tune 3 steps" in text


def test_levers_run_compares_each_variant_with_none():
    from coral_core.errors import UserError
    from coral_core.speedbench import format_levers_table, run_levers

    cfg = SpeedConfig(image_size=32, base_filters=4, pretrain_batch=4, pretrain_steps=2, warmup_steps=1,
                      infer_sizes=(32,), infer_slices=4, infer_batch=2, repeats=1, finetune_steps=3,
                      finetune_batch=2, finetune_size=32, finetune_base_filters=4, device="cpu")
    result = run_levers(cfg, ["none", "channels_last", "data_on_device", "fuse_batchnorm"])
    rows = {r["levers"]: r for r in result["rows"]}
    assert list(rows) == ["none", "channels_last", "data_on_device", "fuse_batchnorm"]
    assert all(rows[name]["pretrain_slices_s"] > 0 for name in ["none", "channels_last", "data_on_device"])
    assert rows["fuse_batchnorm"]["pretrain_slices_s"] is None and rows["fuse_batchnorm"]["inference_32_slices_s"] > 0
    assert rows["channels_last"]["inference_32_slices_s"] > 0 and rows["channels_last"]["finetune_s"] > 0
    assert rows["data_on_device"]["inference_32_slices_s"] is None  # a pretraining lever only
    spread = rows["none"]["pretrain_step_ms"]  # 2 timed steps: their mean rate lies within their spread
    assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    assert spread["min"] <= 1e3 * cfg.pretrain_batch / rows["none"]["pretrain_slices_s"] <= spread["max"] + 1e-6
    assert "pretrain_step_ms" not in rows["fuse_batchnorm"]
    table = format_levers_table(result)
    ratio = rows["channels_last"]["pretrain_slices_s"] / rows["none"]["pretrain_slices_s"]
    assert f"({ratio:.2f}x)" in table
    with pytest.raises(UserError, match="unknown lever variant 'fast'"):
        run_levers(cfg, ["none", "fast"])
