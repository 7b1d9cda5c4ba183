"""EMA of weights: the update formula, swapping in and out, checkpoint state, FSDP2 shards."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from checkpoint import INFO_FILE
from conftest import ROOT, _free_port, load_weights, read_jsonl, train_args
from ema import (check_ema_args, ema_due, load_ema_state, make_ema, save_ema_state, swapped_in,
                 update_ema)
from eval import main as eval_main
from backbone import build_preset
from model import MaskedClassifier, load_classifier


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)  # the head's init
    backbone, inputs = build_preset("vit-tiny")
    return MaskedClassifier(backbone, 3, inputs=inputs).to(dtype)


def perturb(model, k):
    """A known change of the weights, standing in for an optimizer step."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            g = torch.Generator().manual_seed(100 * k + i)
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def test_update_is_decay_times_ema_plus_one_minus_decay_times_weights():
    model, d = tiny_model(), 0.9
    model.head.requires_grad_(False)  # a frozen parameter is its own average: no shadow
    history = [{n: p.detach().double().clone() for n, p in model.named_parameters()}]
    shadow = make_ema(model)
    assert set(shadow) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" not in shadow and len(shadow) > 2
    for k in range(1, 4):
        perturb(model, k)
        update_ema(shadow, model, d)
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    for name, value in shadow.items():
        assert value.dtype == torch.float32
        # unrolled: d^3 w0 + (1 - d) (d^2 w1 + d w2 + w3)
        h = [step[name] for step in history]
        expected = d ** 3 * h[0] + (1 - d) * (d ** 2 * h[1] + d * h[2] + h[3])
        # a few float32 roundings of numbers of the weights' size
        scale = max(float(x.abs().max()) for x in h)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=8 * 2 ** -23 * scale)


def test_shadow_is_float32_for_bf16_weights_and_averages_in_float32():
    model = tiny_model(torch.bfloat16)
    shadow = make_ema(model)
    before = {n: v.clone() for n, v in shadow.items()}
    perturb(model, 1)
    update_ema(shadow, model, 0.999)
    for n, p in model.named_parameters():
        assert shadow[n].dtype == torch.float32
        expected = 0.999 * before[n] + 0.001 * p.detach().float()
        torch.testing.assert_close(shadow[n], expected, rtol=0, atol=1e-6)


def test_swapped_in_evaluates_the_ema_and_restores_the_weights_exactly():
    model = tiny_model()
    shadow = make_ema(model)
    perturb(model, 1)
    update_ema(shadow, model, 0.5)
    perturb(model, 2)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    with swapped_in(model, shadow):
        for n, p in model.named_parameters():
            assert torch.equal(p, shadow[n])
        ema_logits = model(pixel_values=x)
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
    reference = tiny_model()
    reference.load_state_dict({**reference.state_dict(), **shadow})
    torch.testing.assert_close(ema_logits, reference(pixel_values=x))


def test_batchnorm_statistics_are_averaged_with_the_weights_and_swapped_in():
    torch.manual_seed(0)
    backbone, inputs = build_preset("resnet-tiny")
    model, d = MaskedClassifier(backbone, 3, inputs=inputs), 0.8
    shadow = make_ema(model)
    stats = [n for n in shadow if n.endswith(("running_mean", "running_var"))]
    assert stats and not any(n.endswith("num_batches_tracked") for n in shadow)
    before = {n: shadow[n].clone() for n in stats}
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)  # moves the running statistics
    buffers = dict(model.named_buffers())
    assert any(not torch.equal(buffers[n], before[n]) for n in stats)
    update_ema(shadow, model, d)
    for n in stats:
        torch.testing.assert_close(shadow[n], d * before[n] + (1 - d) * buffers[n])
    current = {n: buffers[n].clone() for n in stats}
    with swapped_in(model, shadow):
        assert all(torch.equal(buffers[n], shadow[n]) for n in stats)
    assert all(torch.equal(buffers[n], current[n]) for n in stats)


def test_state_round_trips_through_distributed_checkpoint(tmp_path):
    model = tiny_model()
    shadow = make_ema(model)
    perturb(model, 1)
    update_ema(shadow, model, 0.7)
    save_ema_state(str(tmp_path), shadow)
    fresh = make_ema(tiny_model())
    load_ema_state(str(tmp_path), fresh)
    for n in shadow:
        assert torch.equal(fresh[n], shadow[n])
    with pytest.raises(FileNotFoundError, match="without --ema_decay"):
        load_ema_state(str(tmp_path / "nowhere"), fresh)


def test_every_and_bad_values():
    assert [s for s in range(1, 10) if ema_due(s, 3)] == [3, 6, 9]
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--ema_decay must be in"):
            check_ema_args(bad, 1)
    with pytest.raises(ValueError, match="--ema_every"):
        check_ema_args(0.99, 0)
    check_ema_args(0.0, 1)


CHILD = r"""
import os, sys
import torch
import distributed
from ema import make_ema, update_ema, swapped_in, save_ema_state, load_ema_state
from backbone import build_preset, fsdp_units
from model import MaskedClassifier
from torch.distributed.tensor import DTensor, Replicate
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
from test_ema import perturb

rank, world, _, device = distributed.setup_distributed()
def fresh():
    torch.manual_seed(0)  # the head's init
    backbone, inputs = build_preset("vit-tiny")
    return MaskedClassifier(backbone, 3, inputs=inputs)
full = fresh()
sharded = fresh()
distributed.shard_model(sharded, fsdp_units(sharded.backbone), device, (world,))
shadow, reference = make_ema(sharded), make_ema(full)
for n, p in sharded.named_parameters():
    assert isinstance(shadow[n], DTensor) and shadow[n].placements == p.placements, n
    assert shadow[n].to_local().shape == p.to_local().shape, n
    assert shadow[n].dtype == torch.float32
for k in range(1, 4):
    perturb(full, k)
    with torch.no_grad():  # the same change, applied to the shards
        for (n, p), q in zip(sharded.named_parameters(), full.parameters()):
            whole = DTensor.from_local(q.detach(), p.device_mesh, [Replicate()])
            p.copy_(whole.redistribute(p.device_mesh, p.placements))
    update_ema(shadow, sharded, 0.9)
    update_ema(reference, full, 0.9)
for n in reference:
    torch.testing.assert_close(shadow[n].full_tensor(), reference[n], rtol=1e-6, atol=1e-7)
trained = {n: p.full_tensor() for n, p in sharded.named_parameters()}
with swapped_in(sharded, shadow):
    for n, p in sharded.named_parameters():
        assert torch.equal(p.full_tensor(), shadow[n].full_tensor())
for n, p in sharded.named_parameters():
    assert torch.equal(p.full_tensor(), trained[n])
folder = sys.argv[1]
save_ema_state(folder, shadow)
again = make_ema(distributed.shard_model(fresh(), [], device, (world,)))
load_ema_state(folder, again)
for n in reference:
    assert torch.equal(again[n].full_tensor(), shadow[n].full_tensor()), n
if rank == 0:
    from safetensors.torch import save_file
    save_file(reference, folder + ".reference.safetensors")
distributed.cleanup()
"""


def test_ema_is_sharded_like_the_model_under_fsdp2(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    # every rank's lines: the one that failed first is not always the last to write
    assert out.returncode == 0, out.stderr[-20000:]
    # and a single process reads the shards back into a whole-model shadow
    shadow = make_ema(tiny_model())
    load_ema_state(str(tmp_path / "ckpt"), shadow)
    from safetensors.torch import load_file
    reference = load_file(str(tmp_path / "ckpt.reference.safetensors"))
    assert reference.keys() == shadow.keys()
    for n in shadow:
        torch.testing.assert_close(shadow[n], reference[n], rtol=1e-6, atol=1e-7)


def test_training_evaluates_saves_resumes_and_picks_the_ema(small_data, tiny_vit, tmp_path,
                                                            capsys):
    """--ema_decay through train.py: eval_ema_* beside eval_*, --best_metric ema_*, the EMA model
    under checkpoint-N/ema evaluated by eval.py, and the final evaluation of the EMA weights."""
    out = tmp_path / "run"
    common = ["--eval_steps", 2, "--save_steps", 2, "--lr", 1e-2, "--save_all_checkpoints"]
    train.main(train_args(small_data, tiny_vit, out, *common, "--max_steps", 4, "--ema_decay", 0.5,
                          "--best_metric", "ema_overall_accuracy"))
    records = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # the same partial subset, two sets of weights
        assert r["eval_ema_overall_samples"] == r["eval_overall_samples"] == 20
        assert r["eval_ema_overall_loss"] != r["eval_overall_loss"]
    best = [r for r in records if r["event"] == "best"][-1]
    with open(out / "run_summary.json") as f:
        summary = json.load(f)
    step = best["best_model_step"]
    assert summary["best_metric"] == "ema_overall_accuracy"
    assert summary["best_value"] == best["best_ema_overall_accuracy"] == max(
        r["eval_ema_overall_accuracy"] for r in evals)
    checkpoint = out / f"checkpoint-{step}"
    # the weights that won are the EMA's: named apart from the checkpoint (its raw weights)
    assert summary["final_eval_checkpoint"] == summary["best_model_checkpoint"] == str(
        checkpoint / "ema") == best["best_model_checkpoint"]
    assert summary["best_checkpoint"] == str(checkpoint)

    # checkpoint-N/ema holds the shadow of ema_state/ in the model's own files, no trainer state
    assert not (checkpoint / "ema" / INFO_FILE).exists()
    model, _, _ = load_classifier(str(checkpoint / "ema"))
    shadow = make_ema(model)
    load_ema_state(str(checkpoint), shadow)
    assert all(torch.equal(p, shadow[n]) for n, p in model.named_parameters())
    trained = dict(load_classifier(str(checkpoint))[0].named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters())

    # eval.py takes checkpoint-N/ema as a checkpoint of the run: the final evaluation's numbers
    eval_main([str(checkpoint / "ema"), "--num_workers", "0", "--batch_size", "8"])
    record = read_jsonl(out / "eval_results.jsonl")[-1]
    assert (record["checkpoint"], record["step"]) == (f"checkpoint-{step}/ema", step)
    final = summary["final_eval"]
    assert record["eval_overall_samples"] == final["final_eval_overall_samples"] == 31
    assert record["eval_overall_correct"] == final["final_eval_overall_correct"]
    assert record["eval_overall_loss"] == pytest.approx(final["final_eval_overall_loss"], rel=1e-6)
    # a run directory evaluates each checkpoint's trained weights, not its ema/ folder again
    eval_main([str(out), "--num_workers", "0"])
    assert [r["checkpoint"] for r in read_jsonl(out / "eval_results.jsonl")] == [
        f"checkpoint-{step}/ema", "checkpoint-2", "checkpoint-4"]

    # resuming needs the EMA on exactly when the checkpoint has one
    with pytest.raises(SystemExit):
        train.main(train_args(small_data, tiny_vit, out, *common, "--max_steps", 5,
                              "--resume", "latest"))
    assert "that run kept an EMA of the weights (--ema_decay 0.5)" in capsys.readouterr().err
    plain = tmp_path / "plain"
    train.main(train_args(small_data, tiny_vit, plain, "--max_steps", 1, "--skip_evaluation"))
    with pytest.raises(SystemExit):
        train.main(train_args(small_data, tiny_vit, plain, "--max_steps", 2, "--skip_evaluation",
                              "--ema_decay", 0.5, "--resume", "latest"))
    assert "written without --ema_decay, so its EMA cannot be resumed" in capsys.readouterr().err


def test_a_step_the_fp16_scaler_skips_leaves_the_ema_as_it_was(small_data, tiny_vit, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("MIXTRAIN_FAULT", "nan_loss:3")  # the scaler finds inf and skips step 3
    train.main(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 3, "--save_steps", 2,
                          "--skip_evaluation", "--precision", "fp16", "--ema_decay", 0.5))
    for weights in ("", "ema"):
        a, b = (load_weights(tmp_path / f"checkpoint-{n}" / weights) for n in (2, 3))
        assert all(torch.equal(a[k], b[k]) for k in a), weights
