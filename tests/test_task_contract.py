"""The task contract (tasks/base.py): a fourth task is one subclass of Task and one registry line,
and the loop, checkpoints, resume and eval.py run it unchanged. The class below is what a user
writes: regress each image's mean brightness with a Hugging Face ResNet and a linear head."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl
from safetensors.torch import load_file, save_file
from torch import nn

import eval as eval_script
import tasks
import train
from backbone import load_backbone
from dataset import load_registry, make_loader, read_records
from tasks.base import Task


# ----------------------------------------------------------------------------- the new task
class Regressor(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.config.hidden_sizes[-1], 1)

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output.flatten(1))[:, 0]


class Brightness(Task):
    NAME, MODEL_FILE, SHARED_FLAGS = "brightness", "brightness.json", frozenset({"datasets"})

    def load_data(self, args, say):
        registry = load_registry(args.datasets)
        val = read_records(args.val_data, registry) if args.val_data else None
        return SimpleNamespace(names=list(registry), registry=registry, val=val,
                               train=read_records(args.train_data, registry),
                               partial_indices=list(range(len(val))) if val else [])

    def build_model(self, args, data, dtype, meta=False):
        backbone, inputs = load_backbone(args.model, args.seed, dtype)
        return Regressor(backbone).to(dtype), backbone, inputs

    def loader(self, data, inputs, indices, *, train, batch_size, num_workers, pin_memory, seed=0,
               epoch=0, persistent=False, prefetch_factor=None):
        return make_loader(data.train if train else data.val, indices, inputs, data.names,
                           batch_size=batch_size, num_workers=num_workers, epoch=epoch)

    def forward(self, model, batch, data, train):
        target = batch["pixel_values"].float().mean(dim=(1, 2, 3))
        return {"losses": (model(batch["pixel_values"]) - target) ** 2,
                "dataset_ids": batch["dataset_ids"]}

    def save_model(self, folder, model, inputs, data, args, *, rank):
        model.backbone.save_pretrained(folder)
        inputs.save_pretrained(folder)
        save_file({f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()},
                  os.path.join(folder, "head.safetensors"))
        with open(os.path.join(folder, self.MODEL_FILE), "w") as f:
            json.dump({n: vars(s) for n, s in data.registry.items()}, f)

    def load_model(self, folder, meta=False):
        backbone, inputs = load_backbone(folder)
        model = Regressor(backbone)
        model.load_state_dict(load_file(os.path.join(folder, "head.safetensors")), strict=False)
        return model, inputs, None

    def eval_data(self, args, folder, trained_args, world_size):
        with open(os.path.join(folder, self.MODEL_FILE)) as f:
            registry = load_registry({n: {"num_classes": s["num_classes"]} for n, s in
                                      json.load(f).items()})
        val = read_records(args.val_files, registry)
        data = SimpleNamespace(names=list(registry), registry=registry, train=None, val=val)
        return data, list(range(len(val))), [self.NAME], f"{len(val)} images"
# ----------------------------------------------------------------------------- (54 lines)

NAME = Brightness.NAME


@pytest.fixture
def brightness_task():
    """The class registered as a task (the one line a new task adds to tasks/__init__.py)."""
    tasks.register(Brightness)
    yield tasks.TASKS[NAME]
    del tasks.TASKS[NAME]


def run(argv):
    train.main([str(a) for a in argv])


def test_a_new_task_trains_resumes_exactly_and_is_evaluated(brightness_task, small_data,
                                                            tmp_path):
    common = ["--task", NAME, "--model", "preset:resnet-tiny", "--datasets", small_data["registry"],
              "--train_jsonl", small_data["digits_train"], small_data["faces_train"],
              "--val_jsonl", small_data["digits_val"], small_data["faces_val"],
              "--num_workers", 0, "--batch_size", 8, "--lr", 1e-3, "--logging_steps", 2,
              "--eval_steps", 3, "--save_steps", 3, "--max_steps", 6]
    run([*common, "--output_dir", tmp_path / "whole"])
    # as if killed after checkpoint-3 was written: its later files gone, then resumed
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    for name in ("checkpoint-6", "run_summary.json"):
        path = tmp_path / "resumed" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run([*common, "--output_dir", tmp_path / "resumed", "--resume", "latest"])
    whole, resumed = (load_file(tmp_path / run_dir / "checkpoint-6" / "head.safetensors")
                      for run_dir in ("whole", "resumed"))
    assert torch.equal(whole["head.weight"], resumed["head.weight"])
    logs = [[r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if r["event"] == "train"]
            for d in ("whole", "resumed")]
    assert [r["train_overall_loss"] for r in logs[0]] == [r["train_overall_loss"] for r in logs[1]]
    assert logs[0][0]["train_digits_samples"] + logs[0][0]["train_faces_samples"] == 16
    summary = json.loads((tmp_path / "whole" / "run_summary.json").read_text())
    assert summary["best_metric"] == "overall_loss" and summary["final_eval"][
        "final_eval_overall_samples"] == 31
    eval_script.main([str(tmp_path / "whole"), "--num_workers", "0"])
    records = read_jsonl(tmp_path / "whole" / "eval_results.jsonl")
    assert {r["checkpoint"] for r in records} == {"checkpoint-3", "checkpoint-6"}
    assert all(r["eval_overall_samples"] == 31 for r in records)
    final = summary["final_eval"]["final_eval_overall_loss"]
    best = [r for r in records if r["checkpoint"] == os.path.basename(summary["best_checkpoint"])]
    assert best[0]["eval_overall_loss"] == pytest.approx(final, rel=1e-5)


def test_a_task_without_a_required_function_is_named_when_registered():
    incomplete = type("half_task", (Task,), {"NAME": "half", "MODEL_FILE": "half.json",
                                             "load_data": Brightness.load_data})
    with pytest.raises(TypeError, match="half_task does not define build_model, loader, forward, "
                                        "save_model, load_model, eval_data"):
        tasks.register(incomplete)
    assert "half" not in tasks.TASKS


def test_another_task_flag_is_refused_by_its_owner_name(brightness_task, small_data, tmp_path,
                                                        capsys):
    with pytest.raises(SystemExit) as e:
        run(["--task", NAME, "--model", "preset:resnet-tiny", "--datasets",
             small_data["registry"], "--train_jsonl", small_data["digits_train"],
             "--output_dir", tmp_path, "--mixup", 0.8, "--pooling", "cls"])
    assert e.value.code == 2
    assert ("--mixup, --pooling: for --task classify, not brightness"
            in capsys.readouterr().err)


def test_every_flag_a_task_shares_is_a_general_flag_of_train_or_eval():
    """A name in SHARED_FLAGS that neither parser defines (a typo) would share nothing, quietly:
    the task would refuse its own flag as another task's."""
    import config
    flags = {a.dest for parser in (config.build_parser(None), eval_script.build_parser())
             for a in parser._actions}
    for task in tasks.TASKS.values():
        assert task.SHARED_FLAGS <= flags, (type(task).__name__, task.SHARED_FLAGS - flags)


def test_a_task_sharing_another_tasks_own_flag_is_refused_where_the_parser_is_built():
    """Listed in SHARED_FLAGS, a flag another task owns would be dropped from the list, and the
    task would refuse it as that task's: refused by name instead."""
    import config
    sharing = type("sharing_task", (Brightness,), {"NAME": "sharing",
                                                   "SHARED_FLAGS": frozenset({"mixup"})})
    tasks.register(sharing)
    try:
        with pytest.raises(TypeError, match="sharing_task.SHARED_FLAGS names mixup: another "
                                            "task's own flag"):
            config.build_parser(None)
    finally:
        del tasks.TASKS["sharing"]
