"""The tasks train.py and eval.py run, chosen once by name (--task) or by a checkpoint's files.

Each task is a flat module with the same functions; the loop and the evaluation call only these:
  NAME, MODEL_FILE (marks a checkpoint of the task), DEFAULT_BEST_METRIC, COUNTS (named target
  counts of a batch: what the step loss is divided by, summed over the step on all ranks)
  add_flags(parser)                                   flags only this task reads; another task's
                                                      flag is refused unless in BORROWED_FLAGS
  load_data(args, say) -> data                        every record read and checked up front
                                                      (data.names: datasets, data.train / .val)
  build_model(args, data, dtype, meta) -> (model, backbone, inputs)   meta: see weight_sources
  has_unused_parameters(args, model)                  what DDP must be told
  loader(data, inputs, indices, *, train, batch_size, num_workers, pin_memory, seed, epoch,
         persistent, prefetch_factor)   re-aimed with loader.sampler.set(indices, epoch)
  epoch_order(data, epoch, args, rank, world_size)   this rank's samples of one epoch
  prepare(batch, data, step, micro_index) -> batch    a training micro-batch on the device
  count_targets(batch) -> {name: count}
  forward(model, batch, data, train) -> outputs       what the metrics take (update(**outputs))
  step_loss(outputs, totals, args) -> loss            normalised by the step's global counts
  new_metrics(data, args, device), report(metrics, prefix, title, data), progress(metrics, prefix)
  predictions(outputs, batch, data) -> [dict]         eval.py --predictions
  per_class(predictions, data) -> (dict, text)         eval.py --per_class
  save_model(folder, model, inputs, data, args, rank)  every process (FSDP2: a tensor gathered
                                                      at a time, rank 0 writes)
  load_model(folder, meta)
  weight_sources(model, folder, checkpoint) -> {state-dict key: (file, key)}   (weights.py)
  eval_data(args, folder, trained_args, world_size) -> (data, indices, key, summary)
  eval_extras(args, device), extra_metrics(model, inputs, data, args, extras, rank, world, device)
  finish(args, model, inputs, data, device, main_process)   after the final evaluation
A new task is one module added to TASKS.
"""
import os

from tasks import autoencoder as task_autoencoder
from tasks import classify as task_classify
from tasks import generate as task_generate

TASKS = {task.NAME: task for task in (task_classify, task_generate, task_autoencoder)}


def task_of_checkpoint(folder):
    """The task whose model file the checkpoint folder holds, or None."""
    for task in TASKS.values():
        if os.path.isfile(os.path.join(folder, task.MODEL_FILE)):
            return task
    return None
