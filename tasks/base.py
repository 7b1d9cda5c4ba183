"""The task contract: what train.py's loop and eval.py call on a task, and the defaults of what a
task may leave out. A task is a subclass of Task: it sets NAME and MODEL_FILE and defines the
methods below that raise NotImplementedError (tasks.register checks that it does); the rest it
inherits, overriding only what differs. The loop and eval.py call nothing else, so neither
branches on the task.
"""
import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from checkpoint import checkpoint_folder
from dataset import INDEX_DIR, partial_eval_indices, train_indices
from metrics import PerDatasetLoss
from weights import WeightsMismatch

Say = Callable[[str], None]  # prints on rank 0 only (logs.say_for)
Batch = dict[str, Any]  # tensors, "indices" among them; a loader may add lists ("skipped")
# flag -> (what it needs, a test of args): config.flag_errors refuses the flag where it fails
FlagNeeds = dict[str, tuple[str, Callable[[argparse.Namespace], Any]]]


class TaskData(Protocol):
    """What the loop and eval.py read of a task's data; each task's own class holds more."""
    train: Any  # the training records; None in eval.py (and for a stream)
    val: Any  # the validation records; None without validation files
    partial_indices: list[int]  # the samples of the evaluation during training

    @property
    def names(self) -> Sequence[str]:
        """Dataset names: per-dataset counts and metrics keep this order."""


def run_index_dir(folder):
    """The index folder of the run that wrote checkpoint `folder` (shard indexes it kept)."""
    return os.path.join(os.path.dirname(checkpoint_folder(folder)), INDEX_DIR)


def evaluated_indices(args, trained_args, val, registry):
    """(seed, indices) of what eval.py evaluates: with --partial the subset the evaluation during
    training drew (with --seed, default the run's own), else every sample."""
    seed = args.seed if args.seed is not None else trained_args.get("seed", 0)
    return seed, (partial_eval_indices(val, registry, seed) if args.partial
                  else list(range(len(val))))


class Task:
    """A task's defaults; NAME, MODEL_FILE and the methods that raise NotImplementedError are what
    a subclass must give (REQUIRED)."""
    NAME: ClassVar[str]  # --task NAME
    MODEL_FILE: ClassVar[str]  # the file that marks a checkpoint of the task
    DEFAULT_BEST_METRIC: ClassVar[str] = "overall_loss"
    # The named target counts of a batch: what the step's loss is divided by, summed over the
    # whole step on all ranks (count_targets).
    COUNTS: ClassVar[tuple[str, ...]] = ("samples",)
    # The general flags that not every task reads (config.py's and eval.py's shared sections)
    # which this one reads; under a task that does not name them they are refused.
    SHARED_FLAGS: ClassVar[frozenset[str]] = frozenset()
    # This task's flags that cannot act under some other flags; of train.py's, and of eval.py's.
    FLAG_NEEDS: ClassVar[FlagNeeds] = {}
    EVAL_FLAG_NEEDS: ClassVar[FlagNeeds] = {}
    # This task's flags a resumed run may change (they shape what is written, not the steps
    # taken), beside checkpoint.RESUME_MAY_CHANGE.
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------------------- required

    def load_data(self, args: argparse.Namespace, say: Say) -> TaskData:
        """Every record read and checked before the first step; the summary printed with say."""
        raise NotImplementedError

    def build_model(self, args: argparse.Namespace, data: TaskData, dtype: torch.dtype,
                    meta: bool = False) -> tuple[nn.Module, nn.Module, Any]:
        """(model, backbone, inputs). backbone: what holds the blocks (backbone.fsdp_units);
        inputs: the batch builder loader() takes. meta: the backbone of a model folder with its
        parameters on the meta device; each FSDP2 rank then reads its shards (weight_sources)."""
        raise NotImplementedError

    def loader(self, data: TaskData, inputs: Any, indices: Sequence[int], *, train: bool,
               batch_size: int, num_workers: int, pin_memory: bool, seed: int = 0,
               epoch: int = 0, persistent: bool = False,
               prefetch_factor: int | None = None) -> Iterable[Batch]:
        """Batches of data.train (train) or data.val at `indices`, in that order; re-aimed with
        loader.sampler.set(indices, epoch)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch, data: TaskData,
                train: bool) -> dict[str, Any]:
        """What the metrics take (update(**outputs)) and step_loss reads; by default per-sample
        "losses" and "dataset_ids"."""
        raise NotImplementedError

    def save_model(self, folder: str, model: nn.Module, inputs: Any, data: TaskData,
                   args: argparse.Namespace, *, rank: int) -> None:
        """The model's files in a checkpoint folder, on every process (under FSDP2 each tensor is
        gathered in its turn, rank 0 writes)."""
        raise NotImplementedError

    def load_model(self, folder: str, meta: bool = False) -> tuple[nn.Module, Any, Any]:
        """(model, inputs, info) of a checkpoint folder; meta: as in build_model."""
        raise NotImplementedError

    def eval_data(self, args: argparse.Namespace, folder: str, trained_args: dict,
                  world_size: int) -> tuple[TaskData, list[int], Any, str]:
        """eval.py's data: (data, indices, key: what the results depend on beside the data files,
        summary line)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- defaults

    def add_flags(self, parser: argparse._ArgumentGroup) -> None:
        """train.py's flags only this task reads (a help section of their own)."""

    def add_eval_flags(self, parser: argparse._ArgumentGroup) -> None:
        """eval.py's flags only checkpoints of this task take."""

    def has_unused_parameters(self, args: argparse.Namespace, model: nn.Module) -> bool:
        """Whether some parameters get no gradient in a step (DDP must then look for them)."""
        return False

    def resumed_data(self, data: TaskData, folder: str, args: argparse.Namespace,
                     say: Say) -> TaskData:
        """The data of a run resumed from checkpoint `folder`, where what the checkpoint holds
        decides more than the flags do (a head's rows); by default as load_data read it."""
        return data

    def check_evaluated_together(self, folders: Sequence[str]) -> None:
        """eval.py evaluates checkpoint folders of one run with the data eval_data builds from
        the newest (folders[-1]): raise ValueError where an older one needs other data."""

    def train_size(self, data: TaskData) -> int | None:
        """Training samples of an epoch; None where the data is a stream without epochs (the run
        is then --max_steps long, and a loader with state_dict() saves its position in
        checkpoints)."""
        return len(data.train)

    def epoch_order(self, data: TaskData, epoch: int, args: argparse.Namespace, rank: int,
                    world_size: int) -> list[int]:
        """This rank's training samples of one epoch: a seeded permutation, rank r every W-th."""
        return train_indices(len(data.train), epoch, args.seed, not args.no_shuffle, rank,
                             world_size)

    def prepare(self, batch: Batch, data: TaskData, step: int, micro_index: int) -> Batch:
        """A training micro-batch on the device, before the forward (e.g. Mixup)."""
        return batch

    def count_targets(self, batch: Batch) -> dict[str, int]:
        """The batch's count of each of COUNTS."""
        return {"samples": len(batch["indices"])}

    def step_loss(self, outputs: dict[str, Any], totals: dict[str, int],
                  args: argparse.Namespace) -> torch.Tensor:
        """The sum of the micro-batch's per-sample losses over the samples of the whole step on all
        ranks (not a mean of micro-batch means: exact under accumulation and uneven batches)."""
        return outputs["losses"].sum() / totals["samples"]

    def new_metrics(self, data: TaskData, args: argparse.Namespace | None,
                    device: torch.device) -> Any:
        """Sums all-reducible exactly: here the per-dataset mean of forward's per-sample
        `losses`."""
        return PerDatasetLoss(data.names, device)

    def report(self, metrics: dict[str, float], prefix: str, title: str, data: TaskData) -> str:
        """The console table of an evaluation: one metric a line."""
        return "\n".join([f"{title}:"] + [f"  {k[len(prefix) + 1:]}: {v:.4f}" for k, v in
                                          metrics.items() if k.startswith(prefix + "_")])

    def progress(self, metrics: dict[str, float], prefix: str) -> dict[str, str]:
        """What the progress bar shows: the first loss."""
        loss = next((v for k, v in metrics.items() if k.startswith(prefix) and k.endswith("loss")),
                    None)
        return {} if loss is None else {"loss": f"{loss:.4f}"}

    def predictions(self, outputs: dict[str, Any], batch: Batch, data: TaskData) -> list[dict]:
        """eval.py --predictions: one dict per sample (only tasks that register the flag)."""
        raise NotImplementedError

    def per_class(self, predictions: list[dict], data: TaskData) -> tuple[dict, str]:
        """eval.py --per_class: (JSON-able dict, text) (only tasks that register the flag)."""
        raise NotImplementedError

    def weight_sources(self, model: nn.Module, folder: str,
                       checkpoint: bool) -> dict[str, tuple[str, str]]:
        """{state-dict key: (file, key)} of a folder's weights (weights.py), for FSDP2 ranks that
        read only their shards; a task whose files do not map one to one is read whole on every
        rank."""
        raise WeightsMismatch(f"{folder}: read whole")

    def eval_extras(self, args: argparse.Namespace, device: torch.device) -> Any:
        """What eval.py loads once for every checkpoint (e.g. a judge model); None: nothing."""

    def extra_metrics(self, model: nn.Module, inputs: Any, data: TaskData,
                      args: argparse.Namespace, *, extras: Any, rank: int, world_size: int,
                      device: torch.device) -> dict[str, float]:
        """eval.py's metrics beside evaluate()'s (e.g. of generated samples); extras:
        eval_extras'."""
        return {}

    def finish(self, args: argparse.Namespace, model: nn.Module, inputs: Any, data: TaskData, *,
               device: torch.device, main_process: bool) -> None:
        """After the final evaluation of a run (e.g. write sample images)."""


REQUIRED = ("NAME", "MODEL_FILE", "load_data", "build_model", "loader", "forward", "save_model",
            "load_model", "eval_data")


def check_task(task_class: type[Task]) -> type[Task]:
    """A TypeError naming what of REQUIRED the class does not define; else the class."""
    missing = [name for name in REQUIRED
               if getattr(task_class, name, None) is getattr(Task, name, None)]
    if missing:
        raise TypeError(f"task class {task_class.__name__} does not define {', '.join(missing)} "
                        "(tasks/base.py lists what a task defines)")
    return task_class
