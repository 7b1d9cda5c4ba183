"""--task classify: one masked classifier over several mixed image datasets.

ClassifyTask overrides what differs from tasks/base.py's defaults: a batch's target count is its
number of samples (the default), and the step loss is the sum of per-sample masked
cross-entropies over the global sample count.
"""
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

import distributed
from augment import AUGMENTS, CROP_SCALE, RANDAUGMENT_M, RANDAUGMENT_N, augment_config
from backbone import DEFAULT_PROMPT, load_backbone
from checkpoint import class_moves
from dataset import (
    INDEX_DIR,
    build_stream,
    check_classes,
    check_training_samples,
    count_per_dataset,
    load_registry,
    make_loader,
    make_stream_loader,
    mixture_indices,
    partial_eval_indices,
    pixel_path,
    plan_epochs,
    read_records,
    say_trained_in_val,
    summarize,
)
from ema import check_best_metric
from logs import say
from lora import (
    ADAPTER_FILE,
    adapter_state,
    add_lora,
    check_lora_flags,
    merged_weights,
    scaling,
    trainable_summary,
)
from losses import masked_cross_entropy
from metrics import (
    ClassificationMetrics,
    PerClassMetrics,
    class_name,
    format_per_class,
    format_table,
)
from mixup import check_mix_args, mix_batch
from model import (
    CLASSIFIER_FILE,
    HEAD_FILE,
    POOLINGS,
    LabelSpace,
    MaskedClassifier,
    classify,
    load_classifier,
    read_classifier_info,
    save_classifier,
    set_trainable,
)
from optimizer import check_lr_args
from tasks.base import FlagNeeds, Task, evaluated_indices, run_index_dir
from weights import file_map, folder_map, model_weights, write_safetensors


def check_random_init_trained(model, args):
    """A --random_init part starts from random values: one frozen by --train_only_head, --freeze
    or LoRA stays random. Refused where the head reads through it (a vision backbone's pooler
    under --pooling auto / pooler: every feature would pass a random layer that never learns),
    else announced."""
    frozen = [part for part in args.random_init or ()
              if any(not p.requires_grad for n, p in model.backbone.named_parameters()
                     if n == part or n.startswith(part + "."))]
    if not frozen:
        return
    why = ("--train_only_head" if args.train_only_head else
           f"--freeze {args.freeze}" if args.freeze != "none" else f"--lora_rank {args.lora_rank}")
    remedy = ("name it in --lora_train" if args.lora_rank and not args.train_only_head else
              "train it (leave out " + why + ")")
    read = [p for p in frozen if p.split(".")[0] == "pooler" and not model.token_inputs
            and model.pooling in ("auto", "pooler")]
    if read:
        raise ValueError(f"--random_init {' '.join(read)}: its weights start from random values "
                         f"and {why} keeps them so, while --pooling {args.pooling} feeds the head "
                         f"the backbone's pooler_output through them: {remedy}, or take "
                         "--pooling cls or mean, which do not read it")
    say(f"note: --random_init {' '.join(frozen)}: its weights start from random values and "
        f"{why} keeps them so; the head reads them only if the features pass through them")


@dataclass
class Data:
    """The records, the label layout and the loss options: what a step needs beside the model."""
    registry: dict
    label_space: LabelSpace
    train: object  # data.types.RecordTable, or None in eval.py
    val: object  # data.types.RecordTable, or None without validation files
    partial_indices: list
    masking: bool = True
    label_smoothing: float = 0.0
    skip_bad_images: bool = False
    augment: object = None  # augment.AugmentConfig of training batches (None: none)
    shares: list = None  # dataset shares of each epoch (None: by size, as the files come)
    mix: tuple = None  # (mixup, cutmix, mix_prob, seed): same-dataset Mixup / CutMix
    stream: object = None  # --streaming: the data.stream.ImageStream of training (train is None)
    rows: dict = field(default_factory=dict)  # device -> (num_classes, offsets) tensors

    @property
    def names(self):
        """Dataset names, in registry order (per-dataset counts are kept in this order)."""
        return self.label_space.names

    def head_rows(self, device):
        if device not in self.rows:
            self.rows[device] = self.label_space.tensors(device)
        return self.rows[device]


class ClassifyTask(Task):
    """--task classify: one masked classifier over mixed datasets (the module's docstring)."""
    NAME = "classify"
    MODEL_FILE = CLASSIFIER_FILE  # the file that marks a checkpoint of this task
    DEFAULT_BEST_METRIC = "overall_accuracy"
    SHARED_FLAGS = frozenset({"datasets", "mix_temperature", "partial"})
    RESUME_MAY_CHANGE = frozenset({"on_bad_image"})
    # A flag given that cannot act under the others is an error (config.flag_errors).
    FLAG_NEEDS: ClassVar[FlagNeeds] = {
        "mix_prob": ("--mixup or --cutmix", lambda a: a.mixup or a.cutmix),
        "shuffle_buffer": ("--streaming (and not --no_shuffle)",
                           lambda a: a.streaming and not a.no_shuffle),
        "mix_temperature": (("the sizes of the datasets, which a stream (--streaming) does not "
                             "know before it is read: give sampling_weight in the registry"),
                            lambda a: not a.streaming),
        **{name: ("--lora_rank", lambda a: a.lora_rank)
           for name in ("lora_alpha", "lora_dropout", "lora_targets", "lora_train")},
    }

    def add_flags(self, parser):
        """train.py's flags of the classifier: data, model, head, loss, recipe."""
        a = parser.add_argument
        a("--num_labels", type=int, help="head size (default: what --label_space needs)")
        a("--label_space", choices=["shared", "disjoint"], default="shared",
          help="shared: one max(num_classes) head, class i of every dataset on row i; disjoint: a "
               "slice per dataset")
        a("--pooling", choices=POOLINGS, default="auto",
          help="pooled feature. Vision backbones: pooler, cls or mean (auto: the pooler if it has "
               "one, else mean); vision-language: last (valid token) or mean (over valid tokens), "
               "auto = last")
        a("--prompt", default=DEFAULT_PROMPT,
          help="vision-language backbones: the text after the image; {dataset} becomes the "
               "sample's dataset name")
        a("--random_init", nargs="+", metavar="PART",
          help="backbone parts (module names or prefixes, e.g. pooler) that start from random "
               "values where the --model folder lacks their weights; any other missing weight is "
               "an error")
        a("--min_pixels", type=int,
          help="vision-language image processors: resize images to at least this many pixels")
        a("--max_pixels", type=int,
          help="... and at most this many (fewer image tokens, less memory)")
        a("--freeze", choices=["none", "vision", "llm"], default="none",
          help="freeze the vision tower (of a vision backbone: all of it) or the language model")
        a("--train_only_head", action="store_true", help="linear probe: freeze the whole backbone")
        a("--lora_rank", type=int, default=0,
          help="LoRA adapters of this rank on the backbone's linear layers, the rest of the "
               "backbone frozen (needs peft: pip install -e '.[lora]'); 0 = off")
        a("--lora_alpha", type=float, help="LoRA scaling alpha / rank (default: alpha = rank)")
        a("--lora_dropout", type=float, help="dropout on the LoRA input (default: 0)")
        a("--lora_targets", nargs="+",
          help="linear layers to adapt: full names or last parts (q_proj) (default: the attention "
               "and MLP linears of a vision-language model's LLM, or of a vision backbone's "
               "blocks)")
        a("--lora_train", nargs="+",
          help="backbone modules trained fully beside the adapters and the head, e.g. "
               "visual.merger")
        a("--label_smoothing", type=float, default=0.0,
          help="spread over each sample's valid classes only")
        a("--no_logits_masking", action="store_true",
          help="let every sample predict every head row")
        a("--on_bad_image", choices=["stop", "skip"], default="stop",
          help="an image that fails to decode during training: stop (with a checkpoint) or skip it "
               "and count it")
        a("--augment", choices=AUGMENTS,
          help="training augmentation on the fast image path (default: crop_flip for vision "
               "backbones, none for vision-language ones); a registry entry's augment / hflip "
               "overrides it per dataset. Evaluation keeps the processor's resize / crop")
        a("--crop_scale", nargs=2, type=float, default=list(CROP_SCALE), metavar=("MIN", "MAX"),
          help="area range of the random-resized crop")
        a("--randaugment_n", type=int, default=RANDAUGMENT_N, help="RandAugment ops per image")
        a("--randaugment_m", type=float, default=RANDAUGMENT_M, help="RandAugment magnitude (0-10)")
        a("--mixup", type=float, default=0.0,
          help="Mixup alpha, lambda ~ Beta(alpha, alpha); a sample is mixed only with a sample of "
               "its own dataset in the micro-batch; 0 = off")
        a("--cutmix", type=float, default=0.0,
          help="CutMix alpha, same-dataset pairs; with --mixup one of the two per batch")
        a("--mix_prob", type=float, default=1.0,
          help="probability that a micro-batch is mixed (with --mixup / --cutmix)")
        a("--layer_decay", type=float,
          help="vision backbones: block i of n at lr * D^(n + 1 - i), embeddings (cls / register / "
               "position tokens too) at lr * D^(n + 1), final norm and head at lr")
        a("--vision_lr", type=float,
          help="vision-language backbones: lr of the vision tower without its merger")
        a("--merger_lr", type=float,
          help="vision-language backbones: lr of the projector between vision tower and LLM")
        a("--streaming", action="store_true",
          help="read the training specs (Parquet files or WebDataset shards, local or fsspec URLs) "
               "as a stream through datasets (pip install -e '.[streaming]'): nothing read up "
               "front, labels checked as samples come, shares from the registry's sampling_weight, "
               "the run --max_steps long; resume is exact with the same processes and "
               "--num_workers (docs/data.md)")
        a("--shuffle_buffer", type=int, default=1000,
          help="--streaming: samples read at a time and yielded in a seeded order (1: the files' "
               "order)")

    def add_eval_flags(self, parser):
        """eval.py's flags of classifier checkpoints: overrides of the saved layout, outputs."""
        a = parser.add_argument
        a("--num_labels", type=int, help="head size override (must match the saved head)")
        a("--label_space", choices=["shared", "disjoint"], help="label layout override")
        a("--no_logits_masking", action="store_true",
          help="score all head rows (default: as trained)")
        a("--predictions", metavar="FILE",
          help="write one JSON line per sample and checkpoint (FILE is replaced once all are done)")
        a("--per_class", action="store_true",
          help="per checkpoint and dataset: per-class accuracy / precision / recall / support and "
               "the confusion pairs to RUN_DIR/per_class/CHECKPOINT.json; the worst classes and "
               "most confused pairs printed")

    def load_data(self, args, say):
        """Read and check every record before the first step; print the per-dataset summary."""
        check_lora_flags(args)
        # Without --datasets the registry is the NAME= specs' datasets, completed by their sources.
        registry = load_registry(args.datasets) if args.datasets else {}
        options = {"fixed": bool(args.datasets), "say": say,
                   "index_dir": os.path.join(args.output_dir, INDEX_DIR)}
        train, stream = None, None
        if args.streaming:  # read as it is trained on: the validation data below is read whole
            rank, world_size = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                                if distributed.is_distributed() else (0, 1))
            stream, shares, summary = build_stream(
                args.train_data, registry, bool(args.datasets), seed=args.seed, rank=rank,
                world_size=world_size, buffer=1 if args.no_shuffle else args.shuffle_buffer,
                skip_bad_images=args.on_bad_image == "skip", index_dir=options["index_dir"],
                num_workers=args.num_workers)
        else:
            train = read_records(args.train_data, registry, **options, training=True,
                                 skip_missing_images=args.on_bad_image == "skip")
        val = read_records(args.val_data, registry, **options) if args.val_data else None
        check_classes(registry, [train, val])
        label_space = LabelSpace.build(list(registry), [s.num_classes for s in registry.values()],
                                       args.label_space, args.num_labels)
        check_flags(args, label_space, val)
        if stream is not None:
            # a dataset the validation data adds has no share of the stream (the registry grew)
            check_training_samples(registry, shares + [0] * (len(registry) - len(shares)),
                                   stream=True)
            stream.num_classes = label_space.num_classes
            partial = partial_eval_indices(val, registry, args.seed) if val else []
            say(summary)
            also = ", nor the validation records for training images" if val else ""
            say("note: --streaming: the training images are read as they are trained on, so "
                f"they are not checked for repeats{also}")
        else:
            partial, shares = plan_epochs(registry, train, val, args, say)
            if val is not None:
                say_trained_in_val(val, train, registry, say)
        mix = ((args.mixup, args.cutmix, args.mix_prob, args.seed) if args.mixup or args.cutmix
               else None)
        return Data(registry, label_space, train, val, partial, not args.no_logits_masking,
                    args.label_smoothing, args.on_bad_image == "skip", shares=shares, mix=mix,
                    stream=stream)

    def build_model(self, args, data, dtype, meta=False):
        """(model, backbone, inputs): the classifier, its Hugging Face backbone, and the callable
        that turns PIL images into the backbone's forward arguments. meta: the backbone of a model
        folder with its parameters on the meta device (weight_sources says where they are)."""
        backbone, inputs = load_backbone(args.model, args.seed, dtype, args.prompt,
                                         args.min_pixels, args.max_pixels, meta=meta,
                                         random_init=args.random_init or ())
        model = MaskedClassifier(backbone, data.label_space.num_labels, args.pooling,
                                 inputs=inputs).to(dtype=dtype)
        if args.prompt != DEFAULT_PROMPT and not model.token_inputs:
            raise ValueError("--prompt is for vision-language backbones; "
                             f"{type(backbone).__name__} takes images only")
        set_trainable(model, args.freeze, args.train_only_head)
        if args.lora_rank:  # before gradient checkpointing and sharding: both see the adapters
            model.lora_targets = add_lora(model, args.lora_rank, args.lora_alpha,
                                          args.lora_dropout or 0.0, args.lora_targets,
                                          args.lora_train or ())
            say(trainable_summary(model, model.lora_targets))
        check_random_init_trained(model, args)
        check_mix_args(args.mixup, args.cutmix, args.mix_prob, self.NAME, model.token_inputs,
                       type(backbone).__name__)
        check_lr_args(args, model.token_inputs, type(backbone).__name__)
        data.augment = augment_config(args.augment, data.registry, inputs, args.crop_scale,
                                      args.randaugment_n, args.randaugment_m, args.seed)
        modes = data.augment.modes if data.augment else ["none"] * len(data.names)
        say("augmentation: " + ", ".join(f"{n} {m}" for n, m in zip(data.names, modes)) +
            (" (uint8 fast image path, normalised on the device)"
             if getattr(inputs, "recipe", None) else " (the model's own processor)"))
        return model, backbone, inputs

    def has_unused_parameters(self, args, model):
        """DDP must look for them: with --pooling cls/mean a vision backbone's pooler gets no
        gradient; a vision-language model's vision tower often holds layers its language model
        never reads (those after the feature layer it takes, SigLIP's attention-pooling head)."""
        return model.token_inputs or args.pooling in ("cls", "mean")

    def loader(self, data, inputs, indices, *, train, batch_size, num_workers, pin_memory, seed=0,
               epoch=0, persistent=False, prefetch_factor=None):
        """Batches of data.train (train=True) or data.val at `indices`, in that order; of the
        stream under --streaming (indices unused)."""
        if train and data.stream is not None:
            data.stream.pixels = pixel_path(inputs, True, data.augment)
            return make_stream_loader(data.stream, inputs, data.names, batch_size=batch_size,
                                      num_workers=num_workers, pin_memory=pin_memory,
                                      persistent_workers=persistent,
                                      prefetch_factor=prefetch_factor)
        records = data.train if train else data.val
        return make_loader(records, indices, inputs, data.names, batch_size=batch_size,
                           num_workers=num_workers, pin_memory=pin_memory,
                           skip_bad_images=train and data.skip_bad_images, fast_path=True,
                           augment=data.augment if train else None, epoch=epoch,
                           persistent_workers=persistent, prefetch_factor=prefetch_factor)

    def train_size(self, data):
        """Training samples of an epoch; None for a stream (--streaming), which has no epochs."""
        return None if data.stream is not None else len(data.train)

    def epoch_order(self, data, epoch, args, rank, world_size):
        """This rank's sample order of one epoch: by size, or drawn with the mixture's shares (a
        stream orders itself: none)."""
        if data.stream is not None:
            return []
        return mixture_indices(data.train.dataset_ids, data.shares, epoch, args.seed,
                               shuffle=not args.no_shuffle, rank=rank, world_size=world_size)

    def prepare(self, batch, data, step, micro_index):
        """A training micro-batch on the device, before the forward: same-dataset Mixup / CutMix,
        drawn from (seed, step, micro-batch, sample indices) so resume stays exact."""
        if data.mix is None:
            return batch
        mixup, cutmix, mix_prob, seed = data.mix
        _, offsets = data.head_rows(batch["labels"].device)
        batch, soft = mix_batch(batch, offsets, data.label_space.num_labels, mixup, cutmix,
                                mix_prob, seed, step, micro_index)
        return {**batch, "soft_targets": soft}

    def forward(self, model, batch, data, train):
        """Per-sample losses and masked logits; the batch's contribution to the metrics."""
        num_classes, offsets = data.head_rows(batch["labels"].device)
        logits, targets = classify(model, batch, num_classes, offsets, data.masking)
        # Mixed batches learn soft targets; their metrics stay on the original labels.
        losses = masked_cross_entropy(logits, batch.get("soft_targets", targets),
                                      data.label_smoothing if train else 0.0)
        return {"losses": losses, "logits": logits.float(), "targets": targets,
                "dataset_ids": batch["dataset_ids"]}

    def new_metrics(self, data, args, device):
        """Per-dataset loss, accuracy and top-5 accuracy (metrics.ClassificationMetrics)."""
        return ClassificationMetrics(data.names, data.label_space.num_classes, device)

    def report(self, metrics, prefix, title, data):
        """The per-dataset table (metrics.format_table)."""
        return format_table(metrics, prefix, data.names, title)

    def progress(self, metrics, prefix):
        """What the progress bar shows."""
        return {"loss": f"{metrics[f'{prefix}_overall_loss']:.4f}",
                "acc": f"{metrics[f'{prefix}_overall_accuracy']:.3f}"}

    def predictions(self, outputs, batch, data):
        """One dict per sample: the class in its own dataset, and its probability."""
        _, offsets = data.head_rows(batch["labels"].device)
        probability, row = F.softmax(outputs["logits"], dim=-1).max(dim=-1)
        local = row - offsets[batch["dataset_ids"]]
        out = []
        for index, label, prediction, p in zip(batch["indices"].tolist(), batch["labels"].tolist(),
                                               local.tolist(), probability.tolist()):
            record = data.val[index]
            names = data.registry[data.names[record.dataset_id]].labels
            out.append({"index": index, "image_path": record.image_path,
                        "dataset_name": data.names[record.dataset_id], "label": label,
                        "label_name": class_name(names, label), "prediction": prediction,
                        "prediction_name": class_name(names, prediction), "probability": p})
        return out

    def per_class(self, predictions, data):
        """Per-class accuracy / precision / recall / support and confusion pairs per dataset, from
        the predictions of every sample (complete on rank 0). Returns (JSON-able dict, text)."""
        metrics = PerClassMetrics(data.names, data.label_space.num_classes,
                                  [data.registry[n].labels for n in data.names])
        if predictions:
            ids = {n: i for i, n in enumerate(data.names)}
            metrics.update(*(torch.tensor(column) for column in zip(*[
                (ids[p["dataset_name"]], p["label"], p["prediction"]) for p in predictions])))
        result = metrics.compute()
        return result, format_per_class(result)

    # ------------------------------------------------------------------------- model files

    def save_model(self, folder, model, inputs, data, args, *, rank):
        """The backbone in its own format, processor files, head.safetensors and classifier.json.
        Every process calls it (model: as it holds it, FSDP2 shards too)."""
        info = {"num_labels": data.label_space.num_labels,
                "label_space": data.label_space.layout, "pooling": model.pooling,
                "prompt": inputs.prompt, "no_logits_masking": not data.masking,
                "datasets": saved_datasets(data)}
        weights = model_weights(model)
        if args.lora_rank:  # the adapters, and the backbone merged with them: loads without peft
            info["lora"] = {"rank": args.lora_rank, "alpha": args.lora_alpha or args.lora_rank,
                            "dropout": args.lora_dropout or 0.0, "targets": model.lora_targets,
                            "train": args.lora_train or [], "file": ADAPTER_FILE}
            write_safetensors(os.path.join(folder, ADAPTER_FILE),
                              adapter_state(weights, args.lora_train or ()), rank)
            weights = merged_weights(weights, scaling(args.lora_rank, args.lora_alpha))
        save_classifier(model, inputs, folder, info, weights, rank)

    def load_model(self, folder, meta=False):
        """(model, inputs, info) of a checkpoint folder; meta: the backbone's parameters on the
        meta device."""
        return load_classifier(folder, meta=meta)

    def weight_sources(self, model, folder, checkpoint):
        """Where each entry of the model is stored (weights.py): the backbone's in a model folder;
        with checkpoint, the head's too, in a checkpoint folder of this task."""
        found = folder_map(model.backbone, folder, "backbone.")
        if checkpoint:
            found.update(file_map(os.path.join(folder, HEAD_FILE), model.head.state_dict(),
                                  "head."))
        return found

    def resumed_data(self, data, folder, args, say):
        """Each dataset keeps the head rows the checkpoint gave it, by name, whatever order
        --datasets lists the datasets in now (a disjoint head's rows were handed out anew in
        that order: a dataset trained on another's rows)."""
        path = os.path.join(folder, CLASSIFIER_FILE)
        kept = saved_label_space(read_classifier_info(folder), data.registry, args, path)
        if kept.offsets != data.label_space.offsets:
            say(f"note: --resume: each dataset keeps the head rows {path} gives it ("
                + ", ".join(f"{n} {o}-{o + k - 1}" for n, k, o in zip(
                    kept.names, kept.num_classes, kept.offsets))
                + "), not those of the order --datasets lists them in now")
            data.label_space = kept
        return data

    def check_evaluated_together(self, folders):
        """Every checkpoint puts each dataset's classes in the newest one's head rows (a run
        resumed with its datasets reordered, before a resume kept the rows, did not): another
        layout would be scored against rows that mean other classes."""
        rows = head_rows(read_classifier_info(folders[-1]))
        for folder in folders[:-1]:
            theirs = head_rows(read_classifier_info(folder))
            if theirs != rows:
                raise ValueError(
                    f"{os.path.join(folder, CLASSIFIER_FILE)} puts the datasets' classes in "
                    f"other head rows than {os.path.join(folders[-1], CLASSIFIER_FILE)} (first "
                    f"row and classes: {theirs[0]} against {rows[0]}): evaluate each checkpoint "
                    "on its own")

    def eval_data(self, args, folder, trained_args, world_size):
        """Data for eval.py from a checkpoint's classifier.json and the flags that override it.

        Returns (data, indices, what the results depend on beside the files)."""
        info = read_classifier_info(folder)
        saved = {n: {k: v for k, v in d.items() if k != "offset"}
                 for n, d in info["datasets"].items()}
        path = os.path.join(folder, CLASSIFIER_FILE)
        registry = load_registry(args.datasets or saved, path)
        if all(s.num_classes is not None for s in registry.values()):
            saved_label_space(info, registry, args, path)  # a wrong head: refused before reading
        val = read_records(args.val_files, registry, index_dir=run_index_dir(folder))
        check_classes(registry, [val])
        for name, spec in registry.items():  # --datasets or the sources may order the names anew
            moved = class_moves(saved.get(name, {}).get("labels"), spec.labels)
            if moved:
                raise ValueError(f"dataset {name!r}: the class names of the data sit at other "
                                 f"indices than in the checkpoint's head ({path}): {moved}")
        label_space = saved_label_space(info, registry, args, path)
        masking = not (args.no_logits_masking or info.get("no_logits_masking", False))
        seed, indices = evaluated_indices(args, trained_args, val, registry)
        data = Data(registry, label_space, None, val, indices, masking)
        summary = summarize(count_per_dataset(val, len(registry), indices), registry,
                            "evaluation data")
        key = [{n: vars(s) for n, s in registry.items()}, vars(label_space), masking, args.partial,
               seed]
        return data, indices, key, summary


def check_flags(args, label_space, val_records):
    """The classifier's flags against its data (their ranges, and --best_metric)."""
    for name in ("min_pixels", "max_pixels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive number of pixels, "
                             f"got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.streaming and not args.max_steps:
        raise ValueError("--streaming: a stream has no epochs; give the run's length with "
                         "--max_steps")
    if args.shuffle_buffer < 1:
        raise ValueError(f"--shuffle_buffer must be at least 1, got {args.shuffle_buffer}")
    if args.no_best_tracking:
        return
    # The names metrics.ClassificationMetrics.compute will report on this validation data.
    counts = count_per_dataset(val_records, len(label_space.names))
    present = [(n, k) for n, k, c in zip(label_space.names, label_space.num_classes, counts) if c]
    groups = [("overall", all(k > 5 for _, k in present))] + [(n, k > 5) for n, k in present]
    check_best_metric(args.best_metric, [f"{d}_{m}" for d, top5 in groups for m in (
        "loss", "accuracy") + (("top5_accuracy",) if top5 else ())])


def saved_datasets(data):
    """classifier.json's datasets: each one's registry entry and the first head row it owns."""
    return {n: {"num_classes": s.num_classes, "eval_ratio": s.eval_ratio,
                "description": s.description, "offset": o,
                **({"labels": s.labels} if s.labels else {}),
                **{k: getattr(s, k) for k in ("image_column", "label_column") if getattr(s, k)}}
            for (n, s), o in zip(data.registry.items(), data.label_space.offsets)}


def head_rows(info):
    """{dataset: (first head row, classes)} and the head's size, as a classifier.json gives them
    (the layout's offsets where a file written before they were kept lacks them)."""
    datasets = info["datasets"]
    trained = LabelSpace.build(list(datasets), [d["num_classes"] for d in datasets.values()],
                               info["label_space"], info["num_labels"])
    return {n: (d.get("offset", o), d["num_classes"]) for (n, d), o in zip(
        datasets.items(), trained.offsets)}, info["num_labels"]


def saved_label_space(info, registry, args, path):
    """The head rows of each dataset of `registry` where the checkpoint's classifier.json (`path`)
    puts them: the offsets training used, in whatever order --datasets names the datasets. A
    flag or registry entry that disagrees with the saved head is refused."""
    for flag, value, kept in (("--num_labels", args.num_labels, info["num_labels"]),
                              ("--label_space", args.label_space, info["label_space"])):
        if value is not None and value != kept:
            raise ValueError(f"{flag} {value} does not match the saved head ({path}: "
                             f"{flag[2:]} {kept})")
    datasets, layout = info["datasets"], info["label_space"]
    rows, _ = head_rows(info)
    offsets = []
    for name, spec in registry.items():
        entry = datasets.get(name)
        if entry is None and layout == "shared" and spec.num_classes <= info["num_labels"]:
            offsets.append(0)  # shared rows: class i of any dataset is row i
            continue
        if entry is None:
            raise ValueError(f"--datasets: dataset {name!r} has no rows in the checkpoint's "
                             f"{layout} head ({path} holds {', '.join(datasets)})")
        if spec.num_classes != entry["num_classes"]:
            raise ValueError(f"--datasets: dataset {name!r} has {spec.num_classes} classes, the "
                             f"checkpoint's head {entry['num_classes']} rows for it ({path})")
        offsets.append(rows[name][0])
    return LabelSpace(list(registry), [s.num_classes for s in registry.values()], offsets,
                      info["num_labels"], layout)

