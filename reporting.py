"""Send the records of metrics.jsonl to TensorBoard and / or Weights & Biases (rank 0 only).

metrics.jsonl stays the source of truth; a reporter receives the same (event, step, values)
records and logs their numeric values as scalars grouped by event and dataset:

    train_digits_accuracy in a "train" record  ->  train/digits/accuracy
    eval_overall_accuracy in an "eval" record  ->  eval/overall/accuracy
    lr in a "train" record                     ->  train/lr
    train_text_loss (--task generate)          ->  train/text_loss

Non-numeric values (paths, signal names) are skipped. tensorboard and wandb are optional extras
(`pip install -e '.[tensorboard]'`, `'.[wandb]'`), imported only when asked for. wandb runs in
offline mode unless WANDB_MODE says otherwise, with its files in OUTPUT_DIR/wandb; `wandb sync`
uploads them later.

A resumed run (resume_step: the checkpoint's step) continues the same curves: TensorBoard drops
its events after that step (purge_step; metrics.jsonl drops the same records), and W&B resumes
the run whose id OUTPUT_DIR/wandb/run_id holds. A run started afresh in a folder that has
TensorBoard events starts its curves afresh too, and gets a new W&B run.
"""
import importlib.util
import math
import secrets
import time
import os

REPORT_TO = ("none", "tensorboard", "wandb")
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_report_to(report_to):
    """Raise ValueError naming the flag and the extra for an unknown tool or a missing package;
    call it before the first step. Returns the tools to report to, without 'none'."""
    tools = [t for t in dict.fromkeys(report_to or []) if t != "none"]
    if "none" in (report_to or []) and tools:
        raise ValueError(f"--report_to none cannot be combined with {' '.join(tools)}")
    for tool in tools:
        if tool not in EXTRAS:
            raise ValueError(f"--report_to {tool}: choose from {', '.join(REPORT_TO)}")
        module, extra = EXTRAS[tool]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--report_to {tool}: the {module} package is not installed "
                             f"(pip install -e '.[{extra}]')")
    return tools


def scalar_tags(event, values, dataset_names):
    """{tag: float} for the numeric values of one metrics.jsonl record."""
    names = sorted(list(dataset_names) + ["overall"], key=len, reverse=True)  # longest first
    tags = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        rest = key
        for prefix in (f"{event}_", "train_", "eval_"):
            if rest.startswith(prefix):
                rest = rest[len(prefix):]
                break
        dataset = next((n for n in names if rest.startswith(n + "_")), None)
        tag = f"{event}/{dataset}/{rest[len(dataset) + 1:]}" if dataset else f"{event}/{rest}"
        tags[tag] = float(value)
    return tags


class TensorBoardReporter:
    def __init__(self, output_dir, resume_step=None):
        from torch.utils.tensorboard import SummaryWriter
        folder = os.path.join(output_dir, "tensorboard")
        # events of steps the resumed run writes again (or of an earlier run) are dropped
        purge = resume_step + 1 if resume_step is not None else (0 if os.path.isdir(folder)
                                                                 else None)
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge)

    def log(self, tags, step):
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbReporter:
    def __init__(self, output_dir, run_name=None, config=None, resume_step=None):
        import wandb
        from files import write_text
        os.environ.setdefault("WANDB_MODE", "offline")
        id_file = os.path.join(output_dir, "wandb", "run_id")
        run_id = None
        if resume_step is not None and os.path.isfile(id_file):  # the run this one continues
            with open(id_file) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = secrets.token_hex(6)  # a W&B run id: lowercase letters and digits
            write_text(id_file, run_id + "\n")
        for attempt in range(30):
            try:
                self.run = wandb.init(dir=output_dir, id=run_id, name=run_name,
                                      config=config or {}, resume="allow",
                                      project=os.environ.get("WANDB_PROJECT", "mixtrain"))
                break
            except Exception as e:
                # the W&B service of a killed process of this run holds its id until it notices
                # (a second or two)
                if "in use" not in str(e) or attempt == 29:
                    raise
                time.sleep(1)

    def log(self, tags, step):
        self.run.log(tags, step=step)

    def close(self):
        self.run.finish()


def build_reporters(report_to, output_dir, dataset_names, rank=0, run_name=None, config=None,
                    resume_step=None):
    """The reporters of --report_to on rank 0 (an empty list elsewhere or for 'none');
    resume_step: the step of the checkpoint a resumed run starts from."""
    tools = check_report_to(report_to)
    if rank != 0:
        return []
    reporters = []
    for tool in tools:
        if tool == "tensorboard":
            reporters.append(TensorBoardReporter(output_dir, resume_step))
        else:
            reporters.append(WandbReporter(output_dir, run_name, config, resume_step))
    for reporter in reporters:
        reporter.dataset_names = list(dataset_names)
    return reporters


def report(reporters, event, step, values):
    """Log one metrics.jsonl record (the same event, step and values) to every reporter."""
    for reporter in reporters:
        tags = scalar_tags(event, values, reporter.dataset_names)
        if tags:
            reporter.log(tags, step)


def close_reporters(reporters):
    for reporter in reporters:
        reporter.close()
