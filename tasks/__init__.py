"""The tasks train.py and eval.py run, chosen once by name (--task) or by a checkpoint's files.

A task is one module of functions (tasks/base.py lists them, and holds the defaults of those a
task may leave out); the loop and eval.py call only these, so neither branches on the task. A new
task is one module and one line below.
"""
import os

from tasks import autoencoder, classify
from tasks.generate import task as generate
from tasks.base import complete

TASKS = {}


def register(module):
    """Add a task module (checked, with its missing optional functions filled in)."""
    TASKS[complete(module).NAME] = module
    return module


for _task in (classify, generate, autoencoder):
    register(_task)


def task_of_checkpoint(folder):
    """The task whose model file the checkpoint folder holds, or None."""
    for task in TASKS.values():
        if os.path.isfile(os.path.join(folder, task.MODEL_FILE)):
            return task
    return None
