"""The tasks train.py and eval.py run, chosen once by name (--task) or by a checkpoint's files.

A task is a subclass of tasks.base.Task; the loop and eval.py call only its methods, so neither
branches on the task. A new task is one subclass and one line below.
"""
import os

from tasks.autoencoder import AutoencoderTask
from tasks.base import Task, check_task
from tasks.classify import ClassifyTask
from tasks.generate.task import GenerateTask

TASKS: dict[str, Task] = {}


def register(task_class: type[Task]) -> type[Task]:
    """Add a task (checked: it defines what tasks/base.py requires), one instance under its NAME."""
    TASKS[check_task(task_class).NAME] = task_class()
    return task_class


for _task in (ClassifyTask, GenerateTask, AutoencoderTask):
    register(_task)


def task_of_checkpoint(folder: str) -> Task | None:
    """The task whose model file the checkpoint folder holds, or None."""
    for task in TASKS.values():
        if os.path.isfile(os.path.join(folder, task.MODEL_FILE)):
            return task
    return None
