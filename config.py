"""train.py's configuration: the flags, config files (flat or the original notes' nested layout)
mapped onto the same flags, and the checks that need no data.

    python train.py --config my.yaml --lr 3e-5   # a flag on the command line wins over the file
"""
import argparse
import os

from backbone import ATTN_IMPLEMENTATIONS, DEFAULT_PROMPT, check_attn_implementation
from model import POOLINGS
from dataset import PREFETCH_FACTOR, auto_num_workers
from distributed import SHARDED, check_shard_size
from lora import check_lora_flags
from ema import METRIC_PREFIX, check_ema_args
from reporting import check_report_to
from tasks import TASKS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default after its help, where it has one."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def num_workers(value):
    """--num_workers: a count, or auto (resolved by workers_per_rank)."""
    value = str(value)
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of processes or auto, got {value!r}")
    return int(value)


def loader_workers(args, say, kept):
    """Resolve --num_workers (auto) and --prefetch_factor into args and print the choice; `kept`
    says what the workers outlive (train.py: epochs)."""
    value = args.num_workers
    workers = auto_num_workers() if value == "auto" else value
    if args.prefetch_factor is not None and (args.prefetch_factor < 1 or not workers):
        raise ValueError(f"--prefetch_factor {args.prefetch_factor}: needs a count of at least 1 "
                         f"and worker processes (--num_workers resolves to {workers})")
    args.num_workers, args.prefetch_factor = workers, args.prefetch_factor or PREFETCH_FACTOR
    say(f"data loading: {workers} worker process(es) per rank" +
        (" (--num_workers auto: usable CPUs / local processes - 1, at most 16)"
         if value == "auto" else "") +
        (f", {args.prefetch_factor} batches prefetched per worker, workers kept across {kept}"
         if workers else ""))


def build_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config",
      help="YAML/JSON file whose keys are these flag names (or the nested layout in README.md)")
    a(
        "--task", choices=list(TASKS), default="classify", help=
        "classify: the masked classifier; generate: unified text + image generation (JSON/JSONL "
        "conversations, text_prompt + image_path, image_path + caption); autoencoder: a VAE for "
        "--vae on the images of either kind of record")
    # model and data
    a("--model",
      help="local Hugging Face model folder, or preset:NAME (a fresh random-init backbone)")
    a("--num_labels", type=int, help="head size (default: what --label_space needs)")
    a(
        "--label_space", choices=["shared", "disjoint"], default="shared", help=
        "shared: one max(num_classes) head, class i of every dataset on row i; disjoint: a slice "
        "per dataset"
    )
    a(
        "--pooling", choices=POOLINGS, default="auto", help=
        "pooled feature. Vision backbones: pooler, cls or mean (auto: the pooler if it has one, "
        "else mean); vision-language: last (valid token) or mean (over valid tokens), auto = last")
    a(
        "--prompt", default=DEFAULT_PROMPT, help=
        "vision-language backbones: the text after the image; {dataset} becomes the sample's "
        "dataset name"
    )
    a("--min_pixels", type=int,
      help="vision-language image processors: resize images to at least this many pixels")
    a("--max_pixels", type=int, help="... and at most this many (fewer image tokens, less memory)")
    a("--freeze", choices=["none", "vision", "llm"], default="none",
      help="freeze the vision tower (of a vision backbone: all of it) or the language model")
    a("--train_only_head", action="store_true", help="linear probe: freeze the whole backbone")
    a("--gradient_checkpointing", action="store_true",
      help="recompute activations in backward (less memory)")
    a("--attn_implementation", choices=ATTN_IMPLEMENTATIONS,
      help="attention kernels of the backbone (default: sdpa; eager for a model without sdpa, "
           "e.g. one with no attention layers); flash_attention_2 needs flash-attn and a GPU")
    a("--param_dtype", choices=["fp32", "bf16"], default="fp32",
      help="dtype of the weights and optimizer state; bf16 halves memory for large backbones")
    a("--lora_rank", type=int, default=0,
      help="classify: LoRA adapters of this rank on the backbone's linear layers, the rest of the "
           "backbone frozen (needs peft: pip install -e '.[lora]'); 0 = off")
    a("--lora_alpha", type=float, help="LoRA scaling alpha / rank (default: alpha = rank)")
    a("--lora_dropout", type=float, help="dropout on the LoRA input (default: 0)")
    a("--lora_targets", nargs="+",
      help="linear layers to adapt: full names or last parts (q_proj) (default: the attention and "
           "MLP linears of a vision-language model's LLM, or of a vision backbone's blocks)")
    a("--lora_train", nargs="+",
      help="backbone modules trained fully beside the adapters and the head, e.g. visual.merger")
    # several processes (torchrun)
    a(
        "--dist", choices=["ddp", "fsdp", "hsdp"], default="ddp", help=
        "ddp: a full replica per process; fsdp: FSDP2, weights, gradients and optimizer state "
        "sharded per transformer block (a VLM's vision tower is one unit) over all processes; "
        "hsdp: sharded within groups of --shard_size processes, replicated across groups")
    a("--shard_size", type=int,
      help="--dist hsdp: processes each model copy is sharded over; must divide the number of "
           "processes (default: the processes of one node, LOCAL_WORLD_SIZE)")
    a("--cpu_offload", action="store_true",
      help="--dist fsdp / hsdp: keep sharded weights, gradients and AdamW state in CPU memory")
    a("--sync_batchnorm", action="store_true",
      help="--dist ddp: BatchNorm statistics over the global micro-batch of all processes "
           "(without it each process normalises with its own)")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a(
        "--dist_timeout_minutes", type=float, default=30, help=
        "a collective waiting longer than this on another process fails (a dead rank cannot hang "
        "the job)"
    )
    p.task_flags = {}  # flag -> the task that registered it (check_task_flags)
    for task in TASKS.values():  # each task's own flags
        known = {action.dest for action in p._actions}
        task.add_flags(p)
        p.task_flags.update({action.dest: task.NAME for action in p._actions
                             if action.dest not in known})
    a("--train_jsonl", nargs="+",
      help="one or more training JSONL files (--task generate: JSON too)")
    a("--val_jsonl", nargs="+", help="one or more validation JSONL files")
    a("--datasets", nargs="+",
      help="registry: FILE.yaml/json, or name=num_classes[:eval_ratio] ...")
    a("--output_dir", help="checkpoints, metrics.jsonl and run_summary.json go here")
    a("--overwrite", action="store_true",
      help="delete checkpoints and logs of an earlier run in --output_dir")
    a("--resume", help="'latest' or a checkpoint folder")
    # optimisation
    a("--epochs", type=float, default=3, help="passes over the mixed training data")
    a("--max_steps", type=int, help="optimizer steps; wins over --epochs")
    a("--batch_size", type=int, default=32, help="per device micro-batch")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    a("--weight_decay", type=float, default=0.05,
      help="AdamW weight decay (not on biases and norms)")
    a("--warmup_steps", type=int, default=0, help="linear warmup steps")
    a("--lr_scheduler", choices=["cosine", "linear", "constant"], default="cosine",
      help="decay after warmup")
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    a(
        "--max_bad_steps", type=int, default=5, help=
        "skip an optimizer step whose gradients are not finite; stop after more than this many in "
        "a row"
    )
    a(
        "--on_bad_image", choices=["stop", "skip"], default="stop", help=
        "an image that fails to decode during training: stop (with a checkpoint) or skip it and "
        "count it"
    )
    a("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
      help="autocast dtype (fp16 adds a GradScaler)")
    a("--ema_decay", type=float, default=0,
      help="also keep an exponential moving average of the weights, ema = d * ema + (1 - d) * w "
           "(0: off; e.g. 0.9998); evaluated as eval_ema_*, saved under checkpoint-N/ema/")
    a("--ema_every", type=int, default=1, help="update the EMA after every N optimizer steps")
    a("--label_smoothing", type=float, default=0.0,
      help="spread over each sample's valid classes only")
    a("--no_logits_masking", action="store_true", help="let every sample predict every head row")
    a("--no_shuffle", action="store_true",
      help="keep the files' order instead of a seeded shuffle per epoch")
    a("--seed", type=int, default=42, help="init, data order and partial-eval subsets")
    a("--trust_remote_code", action="store_true",
      help="let a model folder run its own Python code (off: never)")
    a("--num_workers", type=num_workers, default="auto",
      help="DataLoader processes per rank; auto: the CPUs this process may use / local processes "
           "- 1, at most 16")
    a("--prefetch_factor", type=int,
      help=f"batches each DataLoader worker prepares ahead (default: {PREFETCH_FACTOR})")
    # schedule of logging, evaluation and checkpoints
    a("--report_to", nargs="+", default=["none"], choices=["none", "tensorboard", "wandb"],
      help="also send the metrics.jsonl records to TensorBoard (OUTPUT_DIR/tensorboard) and/or "
           "wandb (offline unless WANDB_MODE says otherwise, OUTPUT_DIR/wandb)")
    a("--logging_steps", type=int, default=10, help="train metrics every N steps")
    a("--eval_steps", type=int, default=500,
      help="partial evaluation every N steps (and at the last)")
    a("--eval_cache_mb", type=float, default=2048,
      help="per process: keep the partial evaluation's preprocessed batches in memory up to this "
           "size for the next evaluations; 0: decode them every time")
    a("--save_steps", type=int, default=500, help="checkpoint every N steps (and at the last)")
    a("--save_total_limit", type=int, default=3,
      help="keep this many latest checkpoints (the best is always kept)")
    a("--best_metric", default="overall_accuracy",
      help="overall_accuracy, overall_loss, DATASET_accuracy, ...; ema_ + any of these (with "
           "--ema_decay) ranks the EMA weights")
    a("--best_mode", choices=["max", "min"], help="default: min for *_loss, max otherwise")
    a("--no_best_tracking", action="store_true",
      help="evaluate, but do not track or keep a best checkpoint")
    a("--save_best_only", action="store_true",
      help="write a checkpoint only for a new best, keep only that one")
    a("--save_all_checkpoints", action="store_true", help="keep every checkpoint")
    a(
        "--skip_evaluation", action="store_true", help=
        "no evaluation at all; forces save_all_checkpoints on and best tracking / partial / final "
        "eval off"
    )
    a("--no_partial_eval", action="store_true", help="no evaluation during training")
    a("--no_final_eval", action="store_true",
      help="no full evaluation of the best checkpoint at the end")
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
    ("training", "evaluation", "partial_eval_during_training"): ("no_partial_eval",
                                                                 lambda v: not v),
    ("training", "evaluation", "full_eval_at_end"): ("no_final_eval", lambda v: not v),
    ("loss", "smoothing"): ("label_smoothing", None),
}
SECTIONS = {("model", ), ("data", ), ("datasets", ), ("training", ), ("loss", ),
            ("training", "best_model_tracking"), ("training", "evaluation")}
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
                raise ValueError(
                    "config key loss.type: expected cross_entropy or label_smoothing, got "
                    f"{value!r}"
                )
        elif keys == ("training", "evaluation", "eval_best_model_only"):
            if value is not True:
                raise ValueError(
                    "config key training.evaluation.eval_best_model_only: only true is supported; "
                    "evaluate other checkpoints with eval.py")
        else:
            raise ValueError(
                f"config key {'.'.join(keys)} is not a known setting (see python train.py --help)")
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
        # plain cross-entropy: a smoothing value beside it is unused
        tree["loss"].pop("smoothing", None)
    for section in IGNORED_SECTIONS:
        if section in tree:
            print(
                f"note: config section '{section}' is not used (metrics go to "
                "OUTPUT_DIR/metrics.jsonl)"
            )
    actions = {a.dest: a for a in parser._actions}
    flat = flatten_config(tree, (), set(actions) - {"help", "config"})
    # YAML reads 1e-5 as a string: convert like the command line does
    for name, value in flat.items():
        action = actions[name]
        try:
            if isinstance(value, list) and action.type:
                flat[name] = [action.type(v) for v in value]
            elif isinstance(value, str) and action.nargs == "+" and name != "datasets":
                flat[name] = [value]
            elif value is not None and action.type and not isinstance(value, (list, dict)):
                flat[name] = action.type(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"--config {path}: key {name!r}: cannot read {value!r} as {action.type.__name__}"
            ) from None
        if action.choices and flat[name] not in action.choices:
            raise ValueError(
                f"--config {path}: key {name!r}: {flat[name]!r} is not one of {action.choices}")
    return flat


def parse_args(argv=None, description=None):
    parser = build_parser(description)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    given = check_task_flags(args, parser)
    if given:
        parser.error(given)
    missing = [f"--{n}" for n in ("model", "train_jsonl", "output_dir") if not getattr(args, n)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    # Absolute data paths, so that eval.py can find them again from a checkpoint's
    # training_info.json.
    args.train_jsonl = [os.path.abspath(p) for p in args.train_jsonl]
    args.val_jsonl = [os.path.abspath(p) for p in args.val_jsonl] if args.val_jsonl else None
    return args


def check_task_flags(args, parser):
    """The error for flags another task registered and --task does not read (its BORROWED_FLAGS),
    set away from their defaults on the command line or in --config; None if there are none."""
    task = TASKS[args.task]
    defaults = build_parser()
    given = {}
    for name, owner in parser.task_flags.items():
        if owner != task.NAME and name not in task.BORROWED_FLAGS and \
                getattr(args, name) != defaults.get_default(name):
            given.setdefault(owner, []).append(f"--{name}")
    if not given:
        return None
    return "; ".join(f"{', '.join(flags)}: for --task {owner}, not {task.NAME}"
                     for owner, flags in given.items())


def apply_overrides(args):
    """--skip_evaluation wins over everything that evaluates; returns the list of changes made."""
    changes = []

    def force(name, value, why):
        if getattr(args, name) != value:
            changes.append(f"{name}: {getattr(args, name)} -> {value} ({why})")
            setattr(args, name, value)

    if args.skip_evaluation:
        for name, value in [("save_all_checkpoints", True), ("no_best_tracking", True),
                            ("save_best_only", False), ("no_partial_eval", True),
                            ("no_final_eval", True)]:
            force(name, value, "--skip_evaluation")
    if not args.val_jsonl:
        force("no_partial_eval", True, "no --val_jsonl")
        force("no_final_eval", True, "no --val_jsonl")
    if args.no_partial_eval:
        force("no_best_tracking", True, "no evaluation during training")
    if args.save_best_only and args.no_best_tracking:
        raise ValueError(
            "--save_best_only needs best-model tracking, which needs evaluation during training")
    if args.best_metric == "overall_accuracy":  # the flag's default is the classifier's
        args.best_metric = TASKS[args.task].DEFAULT_BEST_METRIC
    if args.best_mode is None:
        args.best_mode = "min" if args.best_metric.endswith(("loss", "perplexity")) else "max"
    return changes


def check_args(args):
    """Checks that need no data; each task checks its own flags against its data."""
    for name in ("batch_size", "grad_accum", "logging_steps", "eval_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.dist in SHARDED and args.precision == "fp16":
        raise ValueError(
            f"--dist {args.dist} takes --precision bf16 or fp32 (fp16 needs a gradient scaler "
            "FSDP2 does not have)"
        )
    if args.cpu_offload and args.dist not in SHARDED:
        raise ValueError("--cpu_offload needs --dist fsdp or hsdp")
    check_shard_size(args.dist, args.shard_size)
    if args.eval_cache_mb < 0:
        raise ValueError(f"--eval_cache_mb must be 0 (off) or more, got {args.eval_cache_mb}")
    if args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit must be at least 1, got {args.save_total_limit}")
    check_lora_flags(args)
    check_attn_implementation(args.attn_implementation)
    check_report_to(args.report_to)  # a missing package is an error before the first step
    check_ema_args(args.ema_decay, args.ema_every)
    if not args.ema_decay:
        if args.ema_every != 1:
            raise ValueError("--ema_every needs --ema_decay > 0 (there is no EMA to update)")
        if args.best_metric.startswith(METRIC_PREFIX):
            raise ValueError(f"--best_metric {args.best_metric}: the ema_ metrics are of the EMA "
                             "weights, which need --ema_decay > 0")
