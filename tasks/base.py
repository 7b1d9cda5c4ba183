"""The task contract: what train.py's loop and eval.py call on a task, and the defaults of what a
task may leave out. A task is a module; tasks.register checks that it defines every name in
REQUIRED and gives it the defaults below for the rest, so a new task writes only what differs.

Required:
  NAME, MODEL_FILE (the file that marks a checkpoint of the task)
  load_data(args, say) -> data          every record read and checked before the first step;
                                        data.names (datasets, for per-dataset counts), data.train,
                                        data.val (None without validation files),
                                        data.partial_indices (the evaluation during training)
  build_model(args, data, dtype, meta) -> (model, backbone, inputs)
                                        meta: the backbone of a folder with its parameters on the
                                        meta device, each FSDP2 rank then reads its shards
                                        (weight_sources); backbone: what holds the blocks
                                        (backbone.fsdp_units); inputs: the batch builder
  loader(data, inputs, indices, *, train, batch_size, num_workers, pin_memory, seed, epoch,
         persistent, prefetch_factor)   batches of data.train / data.val at `indices`, each a
                                        dict of tensors with "indices"; re-aimed with
                                        loader.sampler.set(indices, epoch)
  forward(model, batch, data, train) -> outputs   what the metrics take (update(**outputs));
                                        by default per-sample "losses" and "dataset_ids"
  save_model(folder, model, inputs, data, args, rank)   on every process (under FSDP2 each
                                        tensor is gathered in its turn, rank 0 writes)
  load_model(folder, meta) -> (model, inputs, info)
  eval_data(args, folder, trained_args, world_size) -> (data, indices, key, summary)
                                        eval.py's data; key: what the results depend on
Everything else below has a default: the step loss (step_loss over the global COUNTS), the
metrics (new_metrics, report, progress, DEFAULT_BEST_METRIC), the epoch order, flags, and the
hooks of eval.py and of the end of a run.
"""
from dataset import train_indices
from metrics import PerDatasetLoss
from weights import WeightsMismatch

REQUIRED = ("NAME", "MODEL_FILE", "load_data", "build_model", "loader", "forward", "save_model",
            "load_model", "eval_data")
OPTIONAL = ("DEFAULT_BEST_METRIC", "COUNTS", "BORROWED_FLAGS", "FLAG_NEEDS", "EVAL_FLAG_NEEDS",
            "RESUME_MAY_CHANGE", "add_flags", "add_eval_flags", "has_unused_parameters",
            "train_size", "epoch_order", "prepare", "count_targets", "step_loss", "new_metrics",
            "report", "progress", "predictions", "per_class", "weight_sources", "eval_extras",
            "extra_metrics", "finish")

DEFAULT_BEST_METRIC = "overall_loss"
# The named target counts of a batch: what the step's loss is divided by, summed over the whole
# step on all ranks (count_targets).
COUNTS = ("samples",)
# Flags another task registers that this one reads too; every other flag of another task given
# is refused (config.flag_errors).
BORROWED_FLAGS = ()
# This task's flags that cannot act under some other flags: flag -> (what it needs, test of args);
# of train.py's flags, and of eval.py's.
FLAG_NEEDS = {}
EVAL_FLAG_NEEDS = {}
# This task's flags a resumed run may change (they shape what is written, not the steps taken),
# beside checkpoint.RESUME_MAY_CHANGE.
RESUME_MAY_CHANGE = frozenset()


def add_flags(parser):
    """train.py's flags only this task reads (a help section of their own)."""


def add_eval_flags(parser):
    """eval.py's flags only checkpoints of this task take."""


def has_unused_parameters(args, model):
    """Whether some parameters get no gradient in a step (DDP must then look for them)."""
    return False


def train_size(data):
    """Training samples of an epoch; None where the data is a stream without epochs (the run is
    then --max_steps long, and a loader with state_dict() saves its position in checkpoints)."""
    return len(data.train)


def epoch_order(data, epoch, args, rank, world_size):
    """This rank's training samples of one epoch: a seeded permutation, rank r every W-th."""
    return train_indices(len(data.train), epoch, args.seed, not args.no_shuffle, rank, world_size)


def prepare(batch, data, step, micro_index):
    """A training micro-batch on the device, before the forward (e.g. Mixup)."""
    return batch


def count_targets(batch):
    return {"samples": len(batch["indices"])}


def step_loss(outputs, totals, args):
    """The sum of the micro-batch's per-sample losses over the samples of the whole step on all
    ranks (not a mean of micro-batch means: exact under accumulation and uneven batches)."""
    return outputs["losses"].sum() / totals["samples"]


def new_metrics(data, args, device):
    """Sums all-reducible exactly: here the per-dataset mean of forward's per-sample `losses`."""
    return PerDatasetLoss(data.names, device)


def report(metrics, prefix, title, data):
    """The console table of an evaluation: one metric a line."""
    return "\n".join([f"{title}:"] + [f"  {k[len(prefix) + 1:]}: {v:.4f}" for k, v in
                                      metrics.items() if k.startswith(prefix + "_")])


def progress(metrics, prefix):
    """What the progress bar shows: the first loss."""
    loss = next((v for k, v in metrics.items() if k.startswith(prefix) and k.endswith("loss")),
                None)
    return {} if loss is None else {"loss": f"{loss:.4f}"}


def predictions(outputs, batch, data):
    """eval.py --predictions: one dict per sample (only tasks that register the flag)."""
    raise NotImplementedError


def per_class(predictions, data):
    """eval.py --per_class: (JSON-able dict, text) (only tasks that register the flag)."""
    raise NotImplementedError


def weight_sources(model, folder, checkpoint):
    """{state-dict key: (file, key)} of a folder's weights (weights.py), for FSDP2 ranks that read
    only their shards; a task whose files do not map one to one is read whole on every rank."""
    raise WeightsMismatch(f"{folder}: read whole")


def eval_extras(args, device):
    """What eval.py loads once for every checkpoint (e.g. a judge model)."""
    return None


def extra_metrics(model, inputs, data, args, extras, rank, world_size, device):
    """eval.py's metrics beside evaluate()'s (e.g. of generated samples)."""
    return {}


def finish(args, model, inputs, data, device, main_process):
    """After the final evaluation of a run (e.g. write sample images)."""


def complete(module):
    """Check that a task module defines every REQUIRED name and give it the defaults above."""
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        raise TypeError(f"task module {module.__name__} does not define {', '.join(missing)} "
                        "(tasks/base.py lists what a task defines)")
    for name in OPTIONAL:
        if not hasattr(module, name):
            setattr(module, name, globals()[name])
    return module
