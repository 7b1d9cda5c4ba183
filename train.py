"""Train one masked classifier over several mixed image datasets (--task classify), or one
unified text + image generation model with a joint loss (--task generate, see unified.py).

    python train.py --config configs/demo.yaml
    python train.py --config configs/demo_generate.yaml
    torchrun --nproc_per_node 8 train.py --config my.yaml --batch_size 32 --grad_accum 2
    torchrun --nnodes 4 --nproc_per_node 8 ... train.py --config my.yaml --dist fsdp --precision bf16

Every flag can also be a key of the --config file (YAML/JSON); flags on the command line
win over the file. One optimizer step, top to bottom:
  fetch grad_accum micro-batches -> count their samples on all ranks -> forward with masked
  logits -> sum of per-sample losses / global count -> backward (gradient sync on the last
  micro-batch only) -> clip -> AdamW step -> log / evaluate / track best / save.
Under torchrun the model is replicated (--dist ddp) or sharded per transformer block with
FSDP2 (--dist fsdp); the loop is the same. So it is for --task generate, whose step loss is
text_loss_weight * (CE summed over target text tokens / their global count)
+ image_loss_weight * (patch-mean MSE summed over noised image tokens / their global count).
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from itertools import islice

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (INFO_FILE, STATE_FILE, list_checkpoints, load_sharded_state, load_trainer_state, prune_checkpoints,
                        read_info, resolve_resume, rng_state, save_sharded_state, set_rng_state, write_atomically,
                        write_json)
from dataset import (DataError, count_per_dataset, load_registry, make_loader, partial_eval_indices, read_jsonl_files,
                     summarize, train_indices)
import distributed
from distributed import all_gather_objects, all_reduce_sum, barrier
from eval import evaluate, evaluate_generation
from losses import masked_cross_entropy
from metrics import ClassificationMetrics, GenerationMetrics, format_generation, format_table
from model import (DEFAULT_PROMPT, REMOTE_CODE, LabelSpace, MaskedClassifier, POOLINGS, autocast, classify,
                   enable_activation_checkpointing, fsdp_units, load_backbone, save_classifier, set_trainable)
from unified import (ImageSpec, UnifiedModel, generate_images, load_language_model, make_generation_loader,
                     read_generation_files, save_grid, save_unified, target_counts, unified_losses)


# ----------------------------------------------------------------------------- configuration

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default after its help, where it has one."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="YAML/JSON file whose keys are these flag names (or the nested layout in README.md)")
    a("--task", choices=["classify", "generate"], default="classify",
      help="classify: the masked classifier; generate: unified text + image generation (JSON/JSONL conversations, "
           "text_prompt + image_path, image_path + caption)")
    # model and data
    a("--model", help="local Hugging Face model folder, or preset:NAME (a fresh random-init backbone)")
    a("--num_labels", type=int, help="head size (default: what --label_space needs)")
    a("--label_space", choices=["shared", "disjoint"], default="shared",
      help="shared: one max(num_classes) head, class i of every dataset on row i; disjoint: a slice per dataset")
    a("--pooling", choices=POOLINGS, default="auto",
      help="pooled feature. Vision backbones: pooler, cls or mean (auto: the pooler if it has one, else mean); "
           "vision-language: last (valid token) or mean (over valid tokens), auto = last")
    a("--prompt", default=DEFAULT_PROMPT,
      help="vision-language backbones: the text after the image; {dataset} becomes the sample's dataset name")
    a("--min_pixels", type=int, help="vision-language image processors: resize images to at least this many pixels")
    a("--max_pixels", type=int, help="... and at most this many (fewer image tokens, less memory)")
    a("--freeze", choices=["none", "vision", "llm"], default="none",
      help="freeze the vision tower (of a vision backbone: all of it) or the language model")
    a("--train_only_head", action="store_true", help="linear probe: freeze the whole backbone")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--param_dtype", choices=["fp32", "bf16"], default="fp32",
      help="dtype of the weights and optimizer state; bf16 halves memory for large backbones")
    # several processes (torchrun)
    a("--dist", choices=["ddp", "fsdp"], default="ddp",
      help="ddp: a full replica per process; fsdp: FSDP2, weights, gradients and optimizer state sharded "
           "per transformer block (a VLM's vision tower is one unit)")
    a("--cpu_offload", action="store_true", help="--dist fsdp: keep sharded weights, gradients and AdamW state in CPU memory")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--dist_timeout_minutes", type=float, default=30,
      help="a collective waiting longer than this on another process fails (a dead rank cannot hang the job)")
    # --task generate
    a("--text_loss_weight", type=float, default=1.0, help="generate: weight of the text cross-entropy")
    a("--image_loss_weight", type=float, default=1.0, help="generate: weight of the image flow-matching MSE")
    a("--image_size", type=int, default=32, help="generate: images are resized to this square size")
    a("--patch_size", type=int, default=4, help="generate: pixels per image token side")
    a("--image_channels", type=int, choices=[1, 3], default=3, help="generate: 1 (grayscale) or 3 (RGB)")
    a("--timestep_shift", type=float, default=1.0, help="generate: shift s of t -> s t / (1 + (s - 1) t), > 1 noisier")
    a("--cond_dropout", type=float, default=0.1, help="generate: share of samples whose images do not see the text")
    a("--sample_prompts", nargs="+", help="generate: at the end, write samples.png with a row of images per prompt")
    a("--samples_per_prompt", type=int, default=8, help="generate: images per prompt in samples.png")
    a("--sample_steps", type=int, default=50, help="generate: Euler steps from noise to image")
    a("--cfg_scale", type=float, default=4.0, help="generate: classifier-free guidance scale of samples.png (1: none)")
    a("--train_jsonl", nargs="+", help="one or more training JSONL files (--task generate: JSON too)")
    a("--val_jsonl", nargs="+", help="one or more validation JSONL files")
    a("--datasets", nargs="+", help="registry: FILE.yaml/json, or name=num_classes[:eval_ratio] ...")
    a("--output_dir", help="checkpoints, metrics.jsonl and run_summary.json go here")
    a("--overwrite", action="store_true", help="delete checkpoints and logs of an earlier run in --output_dir")
    a("--resume", help="'latest' or a checkpoint folder")
    # optimisation
    a("--epochs", type=float, default=3, help="passes over the mixed training data")
    a("--max_steps", type=int, help="optimizer steps; wins over --epochs")
    a("--batch_size", type=int, default=32, help="per device micro-batch")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    a("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on biases and norms)")
    a("--warmup_steps", type=int, default=0, help="linear warmup steps")
    a("--lr_scheduler", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    a("--max_bad_steps", type=int, default=5,
      help="skip an optimizer step whose gradients are not finite; stop after more than this many in a row")
    a("--on_bad_image", choices=["stop", "skip"], default="stop",
      help="an image that fails to decode during training: stop (with a checkpoint) or skip it and count it")
    a("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (fp16 adds a GradScaler)")
    a("--label_smoothing", type=float, default=0.0, help="spread over each sample's valid classes only")
    a("--no_logits_masking", action="store_true", help="let every sample predict every head row")
    a("--no_shuffle", action="store_true", help="keep the files' order instead of a seeded shuffle per epoch")
    a("--seed", type=int, default=42, help="init, data order and partial-eval subsets")
    a("--trust_remote_code", action="store_true", help="let a model folder run its own Python code (off: never)")
    a("--num_workers", type=int, default=2, help="DataLoader processes per rank")
    # schedule of logging, evaluation and checkpoints
    a("--logging_steps", type=int, default=10, help="train metrics every N steps")
    a("--eval_steps", type=int, default=500, help="partial evaluation every N steps (and at the last)")
    a("--save_steps", type=int, default=500, help="checkpoint every N steps (and at the last)")
    a("--save_total_limit", type=int, default=3, help="keep this many latest checkpoints (the best is always kept)")
    a("--best_metric", default="overall_accuracy", help="overall_accuracy, overall_loss, DATASET_accuracy, ...")
    a("--best_mode", choices=["max", "min"], help="default: min for *_loss, max otherwise")
    a("--no_best_tracking", action="store_true", help="evaluate, but do not track or keep a best checkpoint")
    a("--save_best_only", action="store_true", help="write a checkpoint only for a new best, keep only that one")
    a("--save_all_checkpoints", action="store_true", help="keep every checkpoint")
    a("--skip_evaluation", action="store_true",
      help="no evaluation at all; forces save_all_checkpoints on and best tracking / partial / final eval off")
    a("--no_partial_eval", action="store_true", help="no evaluation during training")
    a("--no_final_eval", action="store_true", help="no full evaluation of the best checkpoint at the end")
    return p


# The nested layout of the original design notes -> flag names. (path) -> (flag, transform)
NESTED_KEYS = {
    ("model", "pretrained_name"): ("model", None),
    ("model", "num_labels"): ("num_labels", None),
    ("datasets", "dataset_configs"): ("datasets", None),
    ("datasets", "enable_logits_masking"): ("no_logits_masking", lambda v: not v),
    ("datasets", "shuffle_datasets"): ("no_shuffle", lambda v: not v),
    ("data", "train_jsonl_list"): ("train_jsonl", None),
    ("data", "val_jsonl_list"): ("val_jsonl", None),
    ("training", "best_model_tracking", "enabled"): ("no_best_tracking", lambda v: not v),
    ("training", "best_model_tracking", "metric"): ("best_metric", None),
    ("training", "best_model_tracking", "mode"): ("best_mode", None),
    ("training", "evaluation", "partial_eval_during_training"): ("no_partial_eval", lambda v: not v),
    ("training", "evaluation", "full_eval_at_end"): ("no_final_eval", lambda v: not v),
    ("loss", "smoothing"): ("label_smoothing", None),
}
SECTIONS = {("model",), ("data",), ("datasets",), ("training",), ("loss",), ("training", "best_model_tracking"),
            ("training", "evaluation")}
IGNORED_SECTIONS = ("wandb",)


def flatten_config(tree, path, flags):
    """Map a (possibly nested) config mapping onto flag names; unknown keys are an error."""
    out = {}
    for key, value in tree.items():
        keys = path + (key,)
        # A top-level `datasets` mapping is the registry itself unless it is the notes' section.
        registry = keys == ("datasets",) and isinstance(value, dict) and not {
            "dataset_configs", "enable_logits_masking", "shuffle_datasets"} & set(value)
        if keys in NESTED_KEYS:
            flag, transform = NESTED_KEYS[keys]
            out[flag] = transform(value) if transform else value
        elif keys[0] in IGNORED_SECTIONS:
            continue
        elif keys in SECTIONS and isinstance(value, dict) and not registry:
            out.update(flatten_config(value, keys, flags))
        elif key in flags and not isinstance(value, dict) or keys == ("datasets",):
            out[key] = value
        elif keys == ("loss", "type"):
            if value not in ("cross_entropy", "label_smoothing"):
                raise ValueError(f"config key loss.type: expected cross_entropy or label_smoothing, got {value!r}")
        elif keys == ("training", "evaluation", "eval_best_model_only"):
            if value is not True:
                raise ValueError("config key training.evaluation.eval_best_model_only: only true is supported; "
                                 "evaluate other checkpoints with eval.py")
        else:
            raise ValueError(f"config key {'.'.join(keys)} is not a known setting (see python train.py --help)")
    return out


def load_config(path, parser):
    import yaml
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML/JSON: {e}") from None
    if isinstance(tree.get("loss"), dict) and tree["loss"].get("type") == "cross_entropy":
        tree["loss"].pop("smoothing", None)  # plain cross-entropy: a smoothing value beside it is unused
    for section in IGNORED_SECTIONS:
        if section in tree:
            print(f"note: config section '{section}' is not used (metrics go to OUTPUT_DIR/metrics.jsonl)")
    actions = {a.dest: a for a in parser._actions}
    flat = flatten_config(tree, (), set(actions) - {"help", "config"})
    for name, value in flat.items():  # YAML reads 1e-5 as a string: convert like the command line does
        action = actions[name]
        try:
            if isinstance(value, list) and action.type:
                flat[name] = [action.type(v) for v in value]
            elif isinstance(value, str) and action.nargs == "+" and name != "datasets":
                flat[name] = [value]
            elif value is not None and action.type and not isinstance(value, (list, dict)):
                flat[name] = action.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"--config {path}: key {name!r}: cannot read {value!r} as {action.type.__name__}") from None
        if action.choices and flat[name] not in action.choices:
            raise ValueError(f"--config {path}: key {name!r}: {flat[name]!r} is not one of {action.choices}")
    return flat


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    missing = [f"--{n}" for n in ("model", "train_jsonl", "output_dir") if not getattr(args, n)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    # Absolute data paths, so that eval.py can find them again from a checkpoint's training_info.json.
    args.train_jsonl = [os.path.abspath(p) for p in args.train_jsonl]
    args.val_jsonl = [os.path.abspath(p) for p in args.val_jsonl] if args.val_jsonl else None
    return args


def apply_overrides(args):
    """--skip_evaluation wins over everything that evaluates; returns the list of changes made."""
    changes = []

    def force(name, value, why):
        if getattr(args, name) != value:
            changes.append(f"{name}: {getattr(args, name)} -> {value} ({why})")
            setattr(args, name, value)

    if args.skip_evaluation:
        for name, value in [("save_all_checkpoints", True), ("no_best_tracking", True), ("save_best_only", False),
                            ("no_partial_eval", True), ("no_final_eval", True)]:
            force(name, value, "--skip_evaluation")
    if not args.val_jsonl:
        force("no_partial_eval", True, "no --val_jsonl")
        force("no_final_eval", True, "no --val_jsonl")
    if args.no_partial_eval:
        force("no_best_tracking", True, "no evaluation during training")
    if args.save_best_only and args.no_best_tracking:
        raise ValueError("--save_best_only needs best-model tracking, which needs evaluation during training")
    if args.task == "generate" and args.best_metric == "overall_accuracy":
        args.best_metric = "total_loss"  # the default of the classifier does not exist here
    if args.best_mode is None:
        args.best_mode = "min" if args.best_metric.endswith(("loss", "perplexity")) else "max"
    return changes


GENERATION_METRICS = ("total_loss", "text_loss", "image_loss", "text_perplexity")


def check_args(args, label_space, val_records):
    for name in ("batch_size", "grad_accum", "logging_steps", "eval_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("min_pixels", "max_pixels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive number of pixels, got {getattr(args, name)}")
    if args.dist == "fsdp" and args.precision == "fp16":
        raise ValueError("--dist fsdp takes --precision bf16 or fp32 (fp16 needs a gradient scaler FSDP2 does not have)")
    if args.cpu_offload and args.dist != "fsdp":
        raise ValueError("--cpu_offload needs --dist fsdp")
    if args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit must be at least 1, got {args.save_total_limit}")
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.task == "generate":
        if not args.no_best_tracking and args.best_metric not in GENERATION_METRICS:
            raise ValueError(f"--best_metric {args.best_metric!r} is not one of {', '.join(GENERATION_METRICS)}")
        if args.freeze != "none" or args.train_only_head:
            raise ValueError("--freeze / --train_only_head are for --task classify")
        if not 0 <= args.cond_dropout < 1:
            raise ValueError(f"--cond_dropout must be in [0, 1), got {args.cond_dropout}")
        if args.on_bad_image == "skip":
            raise ValueError("--on_bad_image skip is for --task classify")
    elif not args.no_best_tracking:  # the names metrics.ClassificationMetrics.compute reports
        counts = count_per_dataset(val_records, len(label_space.names))
        present = [(n, k) for n, k, c in zip(label_space.names, label_space.num_classes, counts) if c]
        groups = [("overall", all(k > 5 for _, k in present))] + [(n, k > 5) for n, k in present]
        valid = [f"{d}_{m}" for d, top5 in groups for m in ("loss", "accuracy") + (("top5_accuracy",) if top5 else ())]
        if args.best_metric not in valid:
            raise ValueError(f"--best_metric {args.best_metric!r} is not one of {', '.join(valid)}")


# ----------------------------------------------------------------------------- optimisation

def lr_at(step, args, total_steps):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_scheduler == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    if args.lr_scheduler == "linear":
        return args.lr * max(0.0, 1 - progress)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args, device):
    # No weight decay on biases and norm weights (any parameter with fewer than 2 dims).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- checkpoints and logs

def save_checkpoint(path, model, write_model, optimizer, scaler, info, rank, train_metrics):
    """Atomic checkpoint (see checkpoint.py): every rank writes its share of the model and optimizer
    state; rank 0 adds the whole model gathered in CPU memory (write_model: for eval.py and inference), the
    scaler, every rank's RNG state and unlogged train-metric sums, so a resumed run goes on exactly
    as an uninterrupted one would, its logs included."""
    per_rank = all_gather_objects({"rng": rng_state(), "train_metrics": train_metrics.sums.cpu()})
    # Full tensors on rank 0 only (an empty dict elsewhere); under FSDP a collective, so every rank calls it.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write(tmp):
        save_sharded_state(tmp, model, optimizer)
        if rank == 0:
            write_model(tmp, full)
            torch.save({"scaler": scaler.state_dict(), "ranks": per_rank}, os.path.join(tmp, STATE_FILE))
            injected_fault("kill_in_save", info["step"])
            write_json(os.path.join(tmp, INFO_FILE), info)  # written last: marks the folder complete
    write_atomically(path, write, rank)


def readable(line):
    try:
        return line.endswith("\n") and isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. gradients stay non-finite); the last good checkpoint is kept."""


def injected_fault(point, step):
    """Fault injection for the reliability tests: MIXTRAIN_FAULT="nan_loss:3,kill_in_save:4" makes the
    loss of step 3 NaN and SIGKILLs the process while checkpoint-4 is being written. Off when unset."""
    wanted = f"{point}:{step}"
    if wanted not in os.environ.get("MIXTRAIN_FAULT", "").split(","):
        return False
    if point.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def catch_stop_signals():
    """SIGTERM and SIGUSR1 (Slurm's warning before a time limit) only record their name: the loop
    finishes the current step on every rank, writes a checkpoint and ends with exit code 0.
    Returns (the names received, a function that puts the previous handlers back)."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signal.Signals(signum).name))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    return received, lambda: [signal.signal(s, handler) for s, handler in previous.items()]


class JsonlLog:
    """metrics.jsonl on rank 0: one JSON object per event, flushed at once."""

    def __init__(self, path, rank, keep_through_step=None):
        self.file = None
        if rank != 0:
            return
        if keep_through_step is not None and os.path.isfile(path):
            # Resuming: drop records written after the checkpoint, they will be written again.
            with open(path) as f:
                kept = [line for line in f if readable(line) and json.loads(line).get("step", 0) <= keep_through_step]
            with open(path, "w") as f:  # a record torn by a kill mid-write is dropped with the rest
                f.writelines(kept)
        self.file = open(path, "a")

    def write(self, event, step, epoch, **values):
        if self.file:
            self.file.write(json.dumps({"event": event, "step": step, "epoch": round(epoch, 4), **values}) + "\n")
            self.file.flush()


def prepare_output_dir(args, rank):
    existing = list_checkpoints(args.output_dir)
    if existing and not args.resume and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir} already holds {len(existing)} checkpoint(s) "
                         f"(newest {os.path.basename(existing[-1])}); pass --resume latest to continue or --overwrite to start over")
    if rank == 0:
        if args.overwrite and not args.resume:
            for path in existing:
                shutil.rmtree(path)
            for name in ("metrics.jsonl", "run_summary.json", "eval_results.jsonl"):
                if os.path.exists(os.path.join(args.output_dir, name)):
                    os.remove(os.path.join(args.output_dir, name))
        os.makedirs(args.output_dir, exist_ok=True)
    barrier()


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- training

def main(argv=None):
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    distributed.run(train, args, (DataError, FileNotFoundError, ValueError, TrainingError), args.dist_timeout_minutes)


def train(args, rank, world_size, device):
    main_process = rank == 0
    REMOTE_CODE[0] = args.trust_remote_code
    say = print if main_process else (lambda *a, **k: None)
    overrides = apply_overrides(args)
    for change in overrides:
        say(f"override: {change}")

    # Data: every line of every file is checked here, before the first step.
    generate = args.task == "generate"
    if generate:  # conversations; the partial evaluation uses all validation samples
        train_records = read_generation_files(args.train_jsonl)
        val_records = read_generation_files(args.val_jsonl) if args.val_jsonl else None
        check_args(args, None, val_records)
        partial_indices = list(range(len(val_records))) if val_records else []
        say(f"training data: {len(train_records):,} samples" +
            (f"; validation: {len(val_records):,}" if val_records else ""))
    else:
        registry = load_registry(args.datasets)
        label_space = LabelSpace.build(list(registry), [s.num_classes for s in registry.values()],
                                       args.label_space, args.num_labels)
        train_records = read_jsonl_files(args.train_jsonl, registry)
        val_records = read_jsonl_files(args.val_jsonl, registry) if args.val_jsonl else None
        check_args(args, label_space, val_records)
        partial_indices = partial_eval_indices(val_records, registry, args.seed) if val_records else []
        say(summarize(count_per_dataset(train_records, len(registry)), registry, "training data"))
        if val_records:
            say(summarize(count_per_dataset(val_records, len(registry), partial_indices), registry,
                          "partial evaluation subset", total=count_per_dataset(val_records, len(registry))))
    prepare_output_dir(args, rank)

    # Model: identical init on every rank (DDP also broadcasts rank 0's weights). `model` is what the
    # training step runs (the DDP wrapper, or the FSDP2-sharded classifier); `raw_model` is the classifier
    # itself (under FSDP2 the same module), which evaluation runs: DDP's wrapper only matters in backward.
    torch.manual_seed(args.seed)
    param_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.param_dtype]
    if generate:
        backbone, inputs = load_language_model(args.model, args.seed, param_dtype)  # inputs: the tokenizer
        spec = ImageSpec(args.image_size, args.patch_size, args.image_channels)
        raw_model = UnifiedModel(backbone, spec).to(dtype=param_dtype)
    else:
        backbone, inputs = load_backbone(args.model, args.seed, param_dtype, args.prompt, args.min_pixels,
                                         args.max_pixels)
        raw_model = MaskedClassifier(backbone, label_space.num_labels, args.pooling).to(dtype=param_dtype)
    trainable, total = set_trainable(raw_model, args.freeze, args.train_only_head)
    say(f"{type(backbone).__name__}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.1f}%)")
    if args.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    units = fsdp_units(backbone)  # transformer blocks (and a VLM's vision tower), in order
    if args.compile:
        for unit in units:
            unit.compile()
    model = raw_model
    if args.dist == "fsdp" and world_size > 1:
        # In place: raw_model is now the sharded model, each shard moved to the device (or kept in CPU
        # memory with --cpu_offload); the optimizer below holds the shards.
        model = distributed.shard_model(raw_model, units, device, param_dtype=torch.bfloat16 if args.precision == "bf16"
                                        else None, cpu_offload=args.cpu_offload)
        say(f"FSDP2 over {world_size} processes: {len(units)} block(s) + the root sharded")
    elif world_size > 1:
        # With --pooling cls/mean a vision backbone's own pooler (and final norm, for some) gets no gradient.
        unused = not generate and not raw_model.token_inputs and args.pooling in ("cls", "mean")
        model = DDP(raw_model.to(device), device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=unused)
    else:
        raw_model.to(device)
    if generate:
        def write_model(folder, full_weights):
            save_unified(raw_model, inputs, folder, {"text_loss_weight": args.text_loss_weight,
                                                     "image_loss_weight": args.image_loss_weight}, full_weights)
    else:
        classifier_info = {"num_labels": label_space.num_labels, "label_space": label_space.layout,
                           "pooling": raw_model.pooling, "prompt": inputs.prompt,
                           "no_logits_masking": args.no_logits_masking,
                           "datasets": {n: {"num_classes": s.num_classes, "eval_ratio": s.eval_ratio,
                                            "description": s.description, "offset": o}
                                        for (n, s), o in zip(registry.items(), label_space.offsets)}}

        def write_model(folder, full_weights):
            save_classifier(raw_model, inputs, folder, classifier_info, state_dict=full_weights)
    optimizer = make_optimizer(raw_model, args, device)  # after sharding: FSDP2 replaces the parameters
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    # Schedule: one epoch is this rank's share of the data in micro-batches, grouped by grad_accum.
    per_rank = len(train_records) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(train_records)} training samples cannot be split over {world_size} processes")
    micro_per_epoch = math.ceil(per_rank / args.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    say(f"global batch {args.batch_size * world_size * args.grad_accum} = micro batch {args.batch_size} x "
        f"{world_size} process(es) x grad_accum {args.grad_accum}; {steps_per_epoch} steps per epoch, {total_steps} steps")

    best = {"metric": args.best_metric, "mode": args.best_mode, "value": None, "step": None, "checkpoint": None}
    start_step, last_saved, resumed_window = 0, None, None
    skipped_images = [0] * (1 if generate else len(label_space.names))  # --on_bad_image skip, per dataset
    if args.resume:
        folder = resolve_resume(args.resume, args.output_dir)
        info = read_info(folder)
        state = load_trainer_state(folder)
        load_sharded_state(folder, model, optimizer)  # any world size and --dist the checkpoint was written with
        scaler.load_state_dict(state["scaler"])
        if rank < len(state["ranks"]):  # a different world size starts with fresh RNG and an empty window
            set_rng_state(state["ranks"][rank]["rng"])
            resumed_window = state["ranks"][rank]["train_metrics"]
        start_step, best, last_saved = info["step"], info["best"], folder
        if rank == 0 and len(info.get("skipped_images", [])) == len(skipped_images):
            skipped_images = info["skipped_images"]  # the totals of all ranks so far
        say(f"resumed from {folder} at step {start_step}")
    else:
        torch.manual_seed(args.seed + rank)

    log = JsonlLog(os.path.join(args.output_dir, "metrics.jsonl"), rank,
                   keep_through_step=start_step if args.resume else None)
    if overrides and not args.resume:
        log.write("config", 0, 0.0, overrides=overrides)
    eval_kwargs = dict(batch_size=args.batch_size, device=device, precision=args.precision,
                       num_workers=args.num_workers, rank=rank, world_size=world_size)
    pin_memory = device.type == "cuda"
    if generate:
        train_metrics = GenerationMetrics(args.text_loss_weight, args.image_loss_weight, device)

        def train_loader(indices, epoch):
            return make_generation_loader(train_records, indices, inputs, spec, args.batch_size, args.num_workers,
                                          pin_memory, seed=args.seed, epoch=epoch, shift=args.timestep_shift,
                                          cond_dropout=args.cond_dropout)

        def run_evaluation(indices, prefix):
            return evaluate_generation(raw_model, val_records, indices, inputs, prefix=prefix,
                                       text_weight=args.text_loss_weight, image_weight=args.image_loss_weight,
                                       **eval_kwargs)

        def report(metrics, prefix, title):
            return format_generation(metrics, prefix, title)
    else:
        num_classes_t, offsets_t = label_space.tensors(device)
        masking = not args.no_logits_masking
        train_metrics = ClassificationMetrics(label_space.names, label_space.num_classes, device)

        def train_loader(indices, epoch):
            return make_loader(train_records, indices, inputs, label_space.names, args.batch_size, args.num_workers,
                               pin_memory, skip_bad_images=args.on_bad_image == "skip")

        def run_evaluation(indices, prefix):
            return evaluate(raw_model, val_records, indices, inputs, label_space, prefix=prefix, masking=masking,
                            **eval_kwargs)[0]

        def report(metrics, prefix, title):
            return format_table(metrics, prefix, label_space.names, title)
    if resumed_window is not None and resumed_window.shape == train_metrics.sums.shape:
        train_metrics.sums.copy_(resumed_window)
    better = (lambda a, b: a > b) if args.best_mode == "max" else (lambda a, b: a < b)

    def epoch_of(step):
        return step / steps_per_epoch

    def save(step, metrics):
        nonlocal last_saved
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        if last_saved == path:
            return
        info = {"step": step, "epoch": epoch_of(step), "args": vars(args), "metrics": metrics, "best": best,
                "world_size": world_size, "skipped_images": [int(n) for n in all_reduce_sum(skipped_images, device)]}
        save_checkpoint(path, model, write_model, optimizer, scaler, info, rank, train_metrics)
        last_saved = path
        if main_process:
            if args.save_best_only:
                removed = prune_checkpoints(args.output_dir, 0, protect=[best["checkpoint"]])
            elif not args.save_all_checkpoints:
                removed = prune_checkpoints(args.output_dir, args.save_total_limit, protect=[best["checkpoint"]])
            else:
                removed = []
            for r in removed:
                tqdm.write(f"removed {r} (keep limit)")
        barrier()

    step, bad_steps = start_step, 0
    progress = tqdm(total=total_steps, initial=start_step, disable=not main_process, desc="train", dynamic_ncols=True)
    window_time, window_samples = 0.0, 0  # training time only: evaluation and saving are not counted
    stop_signals, restore_signals = catch_stop_signals()
    while step < total_steps:
        epoch, first_micro = divmod(step, steps_per_epoch)
        first_micro *= args.grad_accum
        order = train_indices(len(train_records), epoch, args.seed, not args.no_shuffle, rank, world_size)
        loader = iter(train_loader(order[first_micro * args.batch_size:], epoch))
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            # Fetch the whole accumulated batch first: the loss is normalised by its global target counts
            # (classify: samples; generate: samples, target text tokens, noised image tokens).
            # The same all-reduce tells every rank whether any rank was asked to stop or could not read its data.
            step_start = time.time()
            try:
                micro_batches, data_error = list(islice(loader, args.grad_accum)), None
            except DataError as e:
                micro_batches, data_error = [], e
            for b in micro_batches:
                for message, dataset_id in b.pop("skipped", []):
                    skipped_images[dataset_id] += 1
                    tqdm.write(f"skipped (--on_bad_image skip): {message}")
            counts = [[len(b["indices"])] + (target_counts(b) if generate else []) for b in micro_batches]
            sums = [sum(c) for c in zip(*counts)] or [0] * (3 if generate else 1)
            *global_counts, stop, failed = all_reduce_sum([*sums, len(stop_signals), data_error is not None], device)
            if failed:
                if step > start_step:
                    save(step, {})
                kept = f"{last_saved} holds the last completed step" if last_saved else "no checkpoint was written"
                raise DataError(f"{data_error}\n({kept})" if data_error else
                                f"another process could not read its data (its error names the file); {kept}")
            lr = lr_at(step, args, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window_before = train_metrics.sums.clone()  # a skipped step leaves the logged window as it was
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                last = i == len(micro_batches) - 1
                if distributed.is_sharded(model):
                    model.set_requires_gradient_sync(last)
                elif world_size > 1:
                    model.require_backward_grad_sync = last  # what DDP's no_sync() sets
                with autocast(device, args.precision):
                    if generate:
                        text, image = unified_losses(model, batch)
                        loss = (args.text_loss_weight * text / max(global_counts[1], 1) +
                                args.image_loss_weight * image / max(global_counts[2], 1))
                    else:
                        logits, targets = classify(model, batch, num_classes_t, offsets_t, masking)
                        losses = masked_cross_entropy(logits, targets, args.label_smoothing)
                        loss = losses.sum() / global_counts[0]
                if injected_fault("nan_loss", step + 1):
                    loss = loss * float("nan")
                # DDP and FSDP average gradients over ranks; multiplying by world_size makes it a global sum / count.
                scaler.scale(loss * world_size).backward()
                if generate:
                    train_metrics.update(text.detach(), counts[i][1], image.detach(), counts[i][2])
                else:
                    train_metrics.update(losses.detach(), logits.detach().float(), targets, batch["dataset_ids"])
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm or float("inf"))
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
                grad_norm = grad_norm.full_tensor()
            # The norm is taken after the gradient all-reduce, so every rank decides the same way. Under fp16
            # the scaler skips overflowing steps itself (and lowers its scale): that is not a bad step.
            if math.isfinite(grad_norm.item()) or scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
                bad_steps = 0
            else:
                bad_steps += 1
                train_metrics.sums.copy_(window_before)
                log.write("skipped_step", step + 1, epoch_of(step + 1), consecutive=bad_steps,
                          reason=f"non-finite gradient norm ({grad_norm.item()})")
                if main_process:
                    tqdm.write(f"step {step + 1} skipped: non-finite gradients ({bad_steps} in a row)")
                if bad_steps > args.max_bad_steps:
                    raise TrainingError(f"{bad_steps} optimizer steps in a row had non-finite gradients (up to step "
                                        f"{step + 1}; --max_bad_steps {args.max_bad_steps}); the last good checkpoint "
                                        f"is {last_saved or 'none'}")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_samples += global_counts[0] if not bad_steps else 0
            window_time += time.time() - step_start
            progress.update(1)

            if (step % args.logging_steps == 0 or step == total_steps) and window_samples:  # none: all steps skipped
                metrics = train_metrics.all_reduce().compute("train")
                train_metrics.reset()
                values = {**metrics, "lr": lr, "grad_norm": grad_norm.item(), "samples_per_second":
                          window_samples / window_time, "max_memory_mb": memory_mb(device)}
                log.write("train", step, epoch_of(step), **values)
                if generate:
                    progress.set_postfix(loss=f"{metrics['train_total_loss']:.4f}", lr=f"{lr:.2e}")
                else:
                    progress.set_postfix(loss=f"{metrics['train_overall_loss']:.4f}",
                                         acc=f"{metrics['train_overall_accuracy']:.3f}", lr=f"{lr:.2e}")
                window_time, window_samples = 0.0, 0

            eval_metrics, new_best = {}, False
            if not args.no_partial_eval and (step % args.eval_steps == 0 or step == total_steps):
                eval_metrics = run_evaluation(partial_indices, "eval")
                log.write("eval", step, epoch_of(step), **eval_metrics)
                if main_process:
                    tqdm.write(report(eval_metrics, "eval", f"partial evaluation at step {step}"))
                if not args.no_best_tracking:
                    value = eval_metrics[f"eval_{args.best_metric}"]
                    if best["value"] is None or better(value, best["value"]):
                        new_best = True
                        best.update(value=value, step=step,
                                    checkpoint=os.path.join(args.output_dir, f"checkpoint-{step}"))
                        log.write("best", step, epoch_of(step), best_model_step=step,
                                  **{f"best_{args.best_metric}": value}, best_checkpoint=best["checkpoint"])
                        if main_process:
                            tqdm.write(f"new best {args.best_metric} = {value:.4f} at step {step}")
            due = step % args.save_steps == 0 or step == total_steps
            injected_fault("kill_before_save", step)
            if new_best or (due and not args.save_best_only):
                save(step, eval_metrics)
            if stop:
                save(step, eval_metrics)
                progress.close()
                names = ",".join(dict.fromkeys(stop_signals)) or "a signal to another process"
                log.write("stopped", step, epoch_of(step), signal=names, checkpoint=last_saved)
                say(f"stopped by {names} after step {step}: {last_saved} written; continue with --resume latest")
                restore_signals()
                return
            if step >= total_steps:
                break
    progress.close()
    restore_signals()

    final_metrics, evaluated = {}, None
    if not args.no_final_eval:
        evaluated = best["checkpoint"] or last_saved
        if best["checkpoint"]:
            load_sharded_state(best["checkpoint"], model)
        say(f"full evaluation of {evaluated} on all {len(val_records):,} validation samples")
        final_metrics = run_evaluation(list(range(len(val_records))), "final_eval")
        log.write("final_eval", step, epoch_of(step), checkpoint=evaluated, **final_metrics)
        if main_process:
            print(report(final_metrics, "final_eval", f"final evaluation of {evaluated}"))
    if generate and args.sample_prompts and (main_process or distributed.is_sharded(raw_model)):
        # A row of images per prompt from the evaluated (best) weights, for a person to look at.
        prompts = [p for p in args.sample_prompts for _ in range(args.samples_per_prompt)]
        images = generate_images(raw_model, inputs, prompts, args.sample_steps, args.cfg_scale, args.seed,
                                 args.timestep_shift, device)
        if main_process:
            save_grid(images, os.path.join(args.output_dir, "samples.png"), args.samples_per_prompt)
            print(f"samples written to {os.path.join(args.output_dir, 'samples.png')} (a row per prompt, "
                  f"cfg scale {args.cfg_scale}, {args.sample_steps} steps)")
    skipped = dict(zip(label_space.names, map(int, all_reduce_sum(skipped_images, device)))) if not generate else {}
    if any(skipped.values()):
        log.write("skipped_images", step, epoch_of(step), **skipped)
        say("images skipped because they could not be decoded: " + ", ".join(f"{n} {c}" for n, c in skipped.items()))
    if main_process:
        summary = {"best_metric": args.best_metric if not args.no_best_tracking else None,
                   "best_value": best["value"], "best_step": best["step"], "best_checkpoint": best["checkpoint"],
                   "final_eval_checkpoint": evaluated, "final_eval": final_metrics, "last_checkpoint": last_saved,
                   "steps": step, "world_size": world_size,
                   "global_batch_size": args.batch_size * world_size * args.grad_accum,
                   "skipped_images": skipped, "overrides": overrides, "config": vars(args)}
        write_json(os.path.join(args.output_dir, "run_summary.json"), summary)
        print(f"run summary written to {os.path.join(args.output_dir, 'run_summary.json')}")


if __name__ == "__main__":
    main()
