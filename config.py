"""train.py's configuration: the flags, config files (flat or the original notes' nested layout)
mapped onto the same flags, and the checks that need no data.

    python train.py --config my.yaml --lr 3e-5   # a flag on the command line wins over the file
"""
import argparse
import os
import sys

import torch

from backbone import ATTN_IMPLEMENTATIONS, check_attn_implementation
from checkpoint import short
from cpu_threads import wait_policy
from dataset import PREFETCH_FACTOR, absolute_spec, auto_num_workers, read_yaml
from distributed import SHARDED, check_shard_size
from ema import METRIC_PREFIX, check_ema_args
from reporting import check_report_to
from tasks import TASKS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default after its help, where it has one."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return action.help + " (default: %(default)s)"


# metrics whose best is their least: losses (recon_loss too), perplexity, the autoencoder's KL
LOWER_IS_BETTER = ("loss", "perplexity", "_kl")


def num_workers(value):
    """--num_workers: a count, or auto (resolved by workers_per_rank)."""
    value = str(value)
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of processes or auto, got {value!r}")
    return int(value)


def loader_workers(args, say, kept, device=None):
    """Resolve --num_workers (auto) and --prefetch_factor into args and print the choice; `kept`
    says what the workers outlive (train.py: epochs). On a CPU `device` with workers the process
    computes with torch's default threads beside them, idle OpenMP threads asleep (cpu_threads.py
    says why); the line says so."""
    value = args.num_workers
    workers = auto_num_workers() if value == "auto" else value
    if args.prefetch_factor is not None and (args.prefetch_factor < 1 or not workers):
        raise ValueError(f"--prefetch_factor {args.prefetch_factor}: needs a count of at least 1 "
                         f"and worker processes (--num_workers resolves to {workers})")
    args.num_workers, args.prefetch_factor = workers, args.prefetch_factor or PREFETCH_FACTOR
    threads = ""
    if workers and device is not None and device.type == "cpu":
        threads = (f"; {torch.get_num_threads()} compute thread(s) in this process beside them "
                   f"(OMP_WAIT_POLICY {wait_policy()})")
    say(f"data loading: {workers} worker process(es) per rank" +
        (" (--num_workers auto: usable CPUs / local processes - 1, at most 16)"
         if value == "auto" else "") +
        (f", {args.prefetch_factor} batches prefetched per worker, workers kept across {kept}"
         if workers else "") + threads)


def add_task_flags(parser, hook, title="--task {}"):
    """Each task's own flags (its `hook`: add_flags for train.py, add_eval_flags for eval.py), in
    a help section per task. parser.task_flags records the tasks that read a flag not every task
    reads, in registry order: a task's own flag its task, a general flag the tasks that name it
    in SHARED_FLAGS."""
    parser.task_flags = {}
    for task in TASKS.values():
        known = {action.dest for action in parser._actions}
        getattr(task, hook)(parser.add_argument_group(title.format(task.NAME)))
        parser.task_flags.update({action.dest: (task.NAME,) for action in parser._actions
                                  if action.dest not in known})
    own = set(parser.task_flags)  # the tasks' own flags
    general = {action.dest for action in parser._actions} - own
    for task in TASKS.values():
        owned = task.SHARED_FLAGS & own
        if owned:  # it would be dropped here, and the task refused its "shared" flag
            raise TypeError(f"{type(task).__name__}.SHARED_FLAGS names {', '.join(sorted(owned))}"
                            ": another task's own flag, not a general one")
        for name in sorted(task.SHARED_FLAGS & general):
            parser.task_flags[name] = parser.task_flags.get(name, ()) + (task.NAME,)


def repeated_aliases(parser, argv):
    """Two spellings of one flag on the command line (--train_data A --train_jsonl B): argparse
    would keep the last silently. Returns the error text, or None."""
    spellings = {o: a for a in parser._actions for o in a.option_strings}
    given = {}  # dest -> the spellings given, in order
    for token in map(str, sys.argv[1:] if argv is None else argv):
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        # argparse also takes an unambiguous prefix of a flag
        found = [name] if name in spellings else [o for o in spellings if o.startswith(name)]
        if len(found) == 1 and len(spellings[found[0]].option_strings) > 1:
            given.setdefault(spellings[found[0]].dest, []).append(found[0])
    errors = [f"{' and '.join(dict.fromkeys(names))} are one flag, given twice: keep one"
              for names in given.values() if len(set(names)) > 1]
    return "; ".join(errors) or None


def given_flags(args, defaults):
    """The flags whose value differs from `defaults` (a parser): set on the command line or in a
    --config file."""
    return {action.dest for action in defaults._actions if action.dest != "help" and
            getattr(args, action.dest, None) != defaults.get_default(action.dest)}


def flag_errors(args, parser, task, given, needs):
    """One check of the flags given, for train.py and eval.py alike: none that `task` does not read
    (another task's, or a shared one it does not name), and none that cannot act under the other
    flags (`needs`: flag -> (what it needs, test of args), the general table and the task's).
    Returns the error text, or None."""
    foreign = {}  # the tasks that read them -> the flags given
    for name in sorted(given):
        readers = parser.task_flags.get(name, (task.NAME,))  # a general flag: every task
        if task.NAME not in readers:
            foreign.setdefault(" / ".join(readers), []).append(name)
    errors = [f"{', '.join('--' + n for n in names)}: for --task {owners}, not {task.NAME}"
              for owners, names in foreign.items()]
    inert = {}  # what is missing -> the flags given that need it
    for name, (what, holds) in needs.items():
        if (name in given and task.NAME in parser.task_flags.get(name, (task.NAME,))
                and not holds(args)):
            inert.setdefault(what, []).append(name)
    errors += [f"{', '.join('--' + n for n in names)}: no effect without {what}"
               for what, names in inert.items()]
    return "; ".join(errors) or None


# A flag given that cannot act under the other flags is an error, never a no-op: flag -> (what it
# needs, test of the flags). Each task keeps such a table for its own flags (FLAG_NEEDS).
FLAG_NEEDS = {
    "ema_every": ("--ema_decay > 0", lambda a: a.ema_decay),
    "cpu_offload": ("--dist fsdp or hsdp", lambda a: a.dist in SHARDED),
    "shard_size": ("--dist hsdp", lambda a: a.dist == "hsdp"),
    # (under --skip_evaluation these are overridden instead: SKIP_EVALUATION_OVERRIDES)
    "save_total_limit": ("a keep limit (not --save_all_checkpoints, --save_best_only)",
                         lambda a: not (a.save_all_checkpoints or a.save_best_only)),
    **{name: ("evaluation during training (--val_data, not --no_partial_eval)",
              lambda a: a.val_data and not a.no_partial_eval)
       for name in ("eval_steps", "eval_cache_mb")},
    **{name: ("best-model tracking (evaluation during training, not --no_best_tracking)",
              lambda a: a.val_data and not (a.no_partial_eval or a.no_best_tracking))
       for name in ("best_metric", "best_mode")},
    "overwrite": ("a new run (--resume continues the one there)", lambda a: not a.resume),
}
# Settings that act only through evaluation (or the best-checkpoint keeping it drives):
# --skip_evaluation overrides them however they are set, noted by apply_overrides, never refused,
# so that one run of a config that evaluates can skip it (design notes: the highest priority).
SKIP_EVALUATION_OVERRIDES = ("eval_steps", "eval_cache_mb", "best_metric", "best_mode",
                             "save_total_limit")


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
    a("--gradient_checkpointing", action="store_true",
      help="recompute activations in backward (less memory)")
    a("--attn_implementation", choices=ATTN_IMPLEMENTATIONS,
      help="attention kernels of the backbone (default: sdpa; eager for a model without sdpa, "
           "e.g. one with no attention layers); flash_attention_2 needs flash-attn and a GPU")
    a("--param_dtype", choices=["fp32", "bf16"], default="fp32",
      help="dtype of the weights and optimizer state; bf16 halves memory for large backbones")
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
    # flags several tasks read (each names them in SHARED_FLAGS; refused under the others)
    shared = p.add_argument_group("flags of several tasks").add_argument
    shared("--datasets", nargs="+",
           help="registry: FILE.yaml/json, or name=num_classes[:eval_ratio] ...")
    shared("--mix_temperature", type=float,
           help="dataset share per epoch proportional to n^(1/T) (1: by size, large: uniform); "
                "or give sampling_weight in the registry")
    shared("--image_size", type=int, default=32, help="images are resized to this square size")
    shared("--image_channels", type=int, choices=[1, 3], default=3,
           help="1 (grayscale) or 3 (RGB)")
    add_task_flags(p, "add_flags")
    a("--train_data", "--train_jsonl", nargs="+", metavar="SPEC",
      help="training data: FILE.jsonl (each line names its dataset; --task generate: JSON too) "
           "or NAME=PATH, PATH an image folder (a subfolder per class), .parquet files or a "
           "save_to_disk folder, or .tar WebDataset shards (a file, folder, glob or {000..099} "
           "range); a prefix folder:, hf:, wds: or jsonl: forces the kind (docs/data.md)")
    a("--val_data", "--val_jsonl", nargs="+", metavar="SPEC",
      help="validation data, the same specs")
    a("--output_dir", help="checkpoints, metrics.jsonl and run_summary.json go here")
    a("--overwrite", action="store_true",
      help="delete checkpoints and logs of an earlier run in --output_dir")
    a("--resume", help="'latest' or a checkpoint folder")
    a("--allow_changed_flags", action="store_true",
      help="--resume: continue although flags that define the run differ from the checkpoint's "
           "(each is named); without it such a resume is refused")
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
    a("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
      help="autocast dtype (fp16 adds a GradScaler)")
    a("--ema_decay", type=float, default=0,
      help="also keep an exponential moving average of the weights, ema = d * ema + (1 - d) * w "
           "(0: off; e.g. 0.9998); evaluated as eval_ema_*, saved under checkpoint-N/ema/")
    a("--ema_every", type=int, default=1, help="update the EMA after every N optimizer steps")
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
    a("--best_mode", choices=["max", "min"],
      help="default: min for *_loss, *_perplexity and *_kl, max otherwise")
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
    ("data", "train_jsonl_list"): ("train_data", None),
    ("data", "val_jsonl_list"): ("val_data", None),
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
ALIASES = {"train_jsonl": "train_data", "val_jsonl": "val_data"}  # config keys of earlier names


def flatten_config(tree, path, flags, where="config", line=lambda keys: None, seen=None):
    """Map a (possibly nested) config mapping onto flag names; unknown keys are an error, and so
    are two keys that set one flag. Errors name `where` (the file) and line(keys), the line of a
    key; `seen`: flag -> the key that set it, over the whole file."""
    out = {}
    seen = {} if seen is None else seen

    def at(keys):
        return where + (f":{line(keys)}" if line(keys) else "")

    def name(keys):
        return ".".join(map(str, keys)) + (f" (line {line(keys)})" if line(keys) else "")

    for key, value in tree.items():
        keys = path + (key,)
        # A top-level `datasets` mapping is the registry itself unless it is the notes' section.
        registry = keys == ("datasets",) and isinstance(value, dict) and not {
            "dataset_configs", "enable_logits_masking", "shuffle_datasets"} & set(value)
        flag = None
        if keys in NESTED_KEYS:
            flag, transform = NESTED_KEYS[keys]
            if transform and not isinstance(value, bool):  # not 'false' would be False
                raise ValueError(f"{at(keys)}: config key {'.'.join(map(str, keys))}: expected "
                                 f"true or false, got {value!r}")
            value = transform(value) if transform else value
        elif keys[0] in IGNORED_SECTIONS:
            continue
        elif keys in SECTIONS and isinstance(value, dict) and not registry:
            out.update(flatten_config(value, keys, flags, where, line, seen))
        elif ALIASES.get(key, key) in flags and not isinstance(value, dict) or keys == (
                "datasets",):
            flag = ALIASES.get(key, key)
        elif keys == ("loss", "type"):
            if value not in ("cross_entropy", "label_smoothing"):
                raise ValueError(
                    f"{at(keys)}: config key loss.type: expected cross_entropy or "
                    f"label_smoothing, got {value!r}")
        elif keys == ("training", "evaluation", "eval_best_model_only"):
            if value is not True:
                raise ValueError(
                    f"{at(keys)}: config key training.evaluation.eval_best_model_only: only true "
                    "is supported; evaluate other checkpoints with eval.py")
        else:
            raise ValueError(f"{at(keys)}: config key {'.'.join(map(str, keys))} is not a known "
                             "setting (see python train.py --help)")
        if flag is not None:
            if flag in seen:  # the file holds two values of one flag: neither may win silently
                raise ValueError(f"{where}: config keys {name(seen[flag])} and {name(keys)} "
                                 f"both set --{flag}: keep one")
            seen[flag] = keys
            out[flag] = value
    return out


def yaml_tree(path, text):
    """(the document, {key path: line}) of a config file's text; a key given twice in one
    mapping is an error naming its line (dataset.read_yaml)."""
    import yaml
    tree, node = read_yaml(text, f"--config {path}")
    lines = {}

    def walk(node, keys):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    lines[keys + (key_node.value,)] = key_node.start_mark.line + 1
                    walk(value_node, keys + (key_node.value,))

    walk(node, ())
    return tree, lines


def load_config(path, parser):
    import yaml
    try:
        with open(path) as f:
            tree, lines = yaml_tree(path, f.read())
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML/JSON: {e}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings (key: value, as in "
                         f"configs/demo.yaml), got a {type(tree).__name__}")
    loss_type = tree["loss"].get("type") if isinstance(tree.get("loss"), dict) else None
    for section in IGNORED_SECTIONS:
        if section in tree:
            print(
                f"note: config section '{section}' is not used (metrics go to "
                "OUTPUT_DIR/metrics.jsonl)"
            )
    actions = {a.dest: a for a in parser._actions}
    keys_of = {}  # flag -> the key of the file that set it

    def line(keys):
        return lines.get(tuple(map(str, keys)))

    def at(name):
        return f"--config {path}" + (f":{line(keys_of[name])}" if line(keys_of[name]) else "")

    flat = flatten_config(tree, (), set(actions) - {"help", "config"}, f"--config {path}", line,
                          keys_of)
    if isinstance(flat.get("datasets"), dict):  # a registry written in this file
        folder = os.path.dirname(os.path.abspath(path))
        for entry in flat["datasets"].values():
            # a class-names file lies beside the registry that names it, as for a registry file
            if isinstance(entry, dict) and isinstance(entry.get("labels"), str):
                entry["labels"] = os.path.join(folder, entry["labels"])
    # YAML reads 1e-5 as a string: convert like the command line does, from the value's text
    # (int("2.7") fails as --grad_accum 2.7 does; int(2.7) would cut it to 2)
    for name, value in flat.items():
        action = actions[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if value is None:  # null: not set
                flat[name] = action.default
            elif not isinstance(value, bool):  # the string 'false' would switch it on
                raise ValueError(f"{at(name)}: key {name!r}: expected true or false, got "
                                 f"{value!r}")
            continue
        try:
            if isinstance(value, bool) and action.type is not None:
                raise ValueError  # YAML's yes / true read as 1
            if isinstance(value, list) and action.type:
                flat[name] = [action.type(str(v)) for v in value]
            elif isinstance(value, str) and action.nargs == "+" and name != "datasets":
                flat[name] = [value]
            elif value is not None and action.type and not isinstance(value, (list, dict)):
                flat[name] = action.type(str(value))
        except (TypeError, ValueError):
            raise ValueError(
                f"{at(name)}: key {name!r}: cannot read {value!r} as {action.type.__name__}"
            ) from None
        if action.choices and flat[name] not in action.choices:
            raise ValueError(
                f"{at(name)}: key {name!r}: {flat[name]!r} is not one of {action.choices}")
    return flat, loss_type


def check_loss_type(loss_type, smoothing, path):
    """The config's loss.type against the label smoothing the run has (file or command line)."""
    if loss_type == "cross_entropy" and smoothing:
        raise ValueError(f"--config {path}: loss.type cross_entropy beside a label smoothing of "
                         f"{smoothing}: give loss.type label_smoothing to use it, or drop it")
    if loss_type == "label_smoothing" and not smoothing:
        raise ValueError(f"--config {path}: config key loss.type label_smoothing needs a "
                         "smoothing (loss.smoothing or --label_smoothing, e.g. 0.1), else the "
                         "loss is plain cross-entropy")


def parse_args(argv=None, description=None):
    parser = build_parser(description)
    known, _ = parser.parse_known_args(argv)
    configured, loss_type = load_config(known.config, parser) if known.config else ({}, None)
    parser.set_defaults(**configured)
    args = parser.parse_args(argv)
    check_loss_type(loss_type, getattr(args, "label_smoothing", 0.0), known.config)
    # the command line wins over the config file, said (apply_overrides): a launcher's own
    # defaults (launch.sh's --lr, --batch_size, --max_steps) would otherwise replace the file's
    args.command_line_over_config = [
        f"{name}: {short(value)} in --config {known.config} -> {short(getattr(args, name))} on "
        "the command line" for name, value in configured.items()
        if getattr(args, name) not in (value, [value])]  # a registry file's one path: a list
    typed = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else map(str, argv))]
    if args.max_steps is not None and ("epochs" in configured or "--epochs" in typed):
        args.command_line_over_config.append(f"epochs: {args.epochs:g} -> unused (--max_steps "
                                             f"{args.max_steps} sets the run's length)")
    error = repeated_aliases(parser, argv)
    if error:
        parser.error(error)
    task = TASKS[args.task]
    given = given_flags(args, build_parser())
    if args.skip_evaluation:  # overridden, with a note (apply_overrides)
        given -= set(SKIP_EVALUATION_OVERRIDES)
    error = flag_errors(args, parser, task, given, {**FLAG_NEEDS, **task.FLAG_NEEDS})
    if error:
        parser.error(error)
    missing = [f"--{n}" for n in ("model", "train_data", "output_dir") if not getattr(args, n)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config)")
    # Absolute data paths, so that eval.py can find them again from a checkpoint's
    # training_info.json.
    args.train_data = [absolute_spec(p) for p in args.train_data]
    args.val_data = [absolute_spec(p) for p in args.val_data] if args.val_data else None
    return args


def apply_overrides(args):
    """--skip_evaluation wins over everything that evaluates; returns the list of changes made,
    parse_args's first: the config file's values the command line replaced, an --epochs given
    beside --max_steps."""
    changes = vars(args).pop("command_line_over_config", [])

    def force(name, value, why):
        if getattr(args, name) != value:
            changes.append(f"{name}: {getattr(args, name)} -> {value} ({why})")
            setattr(args, name, value)

    if args.skip_evaluation:
        for name, value in [("save_all_checkpoints", True), ("no_best_tracking", True),
                            ("save_best_only", False), ("no_partial_eval", True),
                            ("no_final_eval", True)]:
            force(name, value, "--skip_evaluation")
        defaults = build_parser()
        changes += [f"{name}: {getattr(args, name)} -> unused (--skip_evaluation)"
                    for name in SKIP_EVALUATION_OVERRIDES
                    if getattr(args, name) != defaults.get_default(name)]
    if not args.val_data:
        force("no_partial_eval", True, "no --val_data")
        force("no_final_eval", True, "no --val_data")
    if args.no_partial_eval:
        force("no_best_tracking", True, "no evaluation during training")
    if args.save_best_only and args.no_best_tracking:
        raise ValueError(
            "--save_best_only needs best-model tracking, which needs evaluation during training")
    if args.best_metric == "overall_accuracy":  # the flag's default is the classifier's
        args.best_metric = TASKS[args.task].DEFAULT_BEST_METRIC
    if args.best_mode is None:
        args.best_mode = "min" if args.best_metric.endswith(LOWER_IS_BETTER) else "max"
    return changes


def check_args(args):
    """Checks that need no data; each task checks its own flags against its data."""
    for name in ("batch_size", "grad_accum", "logging_steps", "eval_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be at least 1, got {args.max_steps}")
    if not args.epochs > 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    if args.dist in SHARDED and args.precision == "fp16":
        raise ValueError(
            f"--dist {args.dist} takes --precision bf16 or fp32 (fp16 needs a gradient scaler "
            "FSDP2 does not have)"
        )
    check_shard_size(args.shard_size)
    if args.eval_cache_mb < 0:
        raise ValueError(f"--eval_cache_mb must be 0 (off) or more, got {args.eval_cache_mb}")
    if args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit must be at least 1, got {args.save_total_limit}")
    check_attn_implementation(args.attn_implementation)
    check_report_to(args.report_to)  # a missing package is an error before the first step
    check_ema_args(args.ema_decay, args.ema_every)
    if not args.ema_decay and args.best_metric.startswith(METRIC_PREFIX):
        raise ValueError(f"--best_metric {args.best_metric}: the ema_ metrics are of the EMA "
                         "weights, which need --ema_decay > 0")
