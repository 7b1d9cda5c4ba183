"""Evaluate one checkpoint, or every checkpoint-* in a run directory.

    python eval.py RUN_DIR_OR_CHECKPOINT [--val_jsonl a.jsonl b.jsonl] [--predictions preds.jsonl]
    torchrun --nproc_per_node 4 eval.py RUN_DIR ...   # exact: every sample counted once
    torchrun --nproc_per_node 8 eval.py RUN_DIR --dist fsdp   # a model too large for one device

For generation checkpoints (train.py --task generate) it reports text loss / perplexity and
image MSE at fixed t, and with --judge CLASSIFIER the classifier's accuracy on images generated
for each of its classes, with and without classifier-free guidance:

    python eval.py runs/demo_generate --judge runs/digits/checkpoint-500 --judge_prompt "a handwritten digit {label}"

For classifiers, the dataset registry, head size, label layout and image preprocessing come from the
checkpoint; the flags below override them. Results are appended to
RUN_DIR/eval_results.jsonl, and a checkpoint already evaluated on the same data is skipped
unless --force is given. `evaluate` is the one evaluation function that training uses too.
"""
import argparse
import datetime
import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F

from checkpoint import checkpoint_step, list_checkpoints, read_info
from dataset import (DataError, count_per_dataset, load_registry, make_loader, partial_eval_indices,
                     read_jsonl_files, summarize)
import distributed
from distributed import all_gather_objects, all_reduce_sum, is_sharded, shard_model
from losses import masked_cross_entropy
from metrics import ClassificationMetrics, GenerationMetrics, format_generation, format_table
from model import LabelSpace, autocast, classify, fsdp_units, load_classifier, read_classifier_info
from unified import (SPEC_FILE, generate_images, generate_text, load_image, load_unified, make_generation_loader,
                     read_generation_files, target_counts, to_pil, unified_losses)

RESULTS_FILE = "eval_results.jsonl"


@torch.no_grad()
def evaluate(model, records, indices, inputs, label_space, *, batch_size, device, precision="fp32",
             masking=True, num_workers=0, prefix="eval", rank=0, world_size=1, with_predictions=False):
    """Metrics over records[indices], exact under torchrun: rank r takes indices[r::world_size]
    (no padding, no duplicates) and the per-dataset sums are all-reduced. An FSDP2-sharded model
    gathers its weights in every forward, so there a rank with fewer batches runs throw-away
    forwards until every rank has run as many.

    Returns (metrics dict, predictions); predictions (rank-0 complete, in `indices` order) only
    with `with_predictions`: dicts with index, label, prediction (class in the sample's own
    dataset) and probability.
    """
    was_training = model.training
    model.eval()
    num_classes, offsets = label_space.tensors(device)
    metrics = ClassificationMetrics(label_space.names, label_space.num_classes, device)
    predictions = []
    loader = make_loader(records, indices[rank::world_size], inputs, label_space.names, batch_size, num_workers,
                         pin_memory=device.type == "cuda")
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            logits, targets = classify(model, batch, num_classes, offsets, masking)
        logits = logits.float()
        metrics.update(masked_cross_entropy(logits, targets), logits, targets, batch["dataset_ids"])
        if with_predictions:
            prob, row = F.softmax(logits, dim=-1).max(dim=-1)
            local = row - offsets[batch["dataset_ids"]]
            predictions += [{"index": i, "label": y, "prediction": p, "probability": q} for i, y, p, q in zip(
                batch["indices"].tolist(), batch["labels"].tolist(), local.tolist(), prob.tolist())]
    filler = make_loader(records, indices[:1], inputs, label_space.names, 1, 0)
    for batch in missing_forwards(model, loader, filler, len(indices), world_size, batch_size):
        with autocast(device, precision):
            classify(model, {k: v.to(device) for k, v in batch.items()}, num_classes, offsets, masking)
    model.train(was_training)
    result = metrics.all_reduce().compute(prefix)
    if with_predictions and world_size > 1:
        order = {index: position for position, index in enumerate(indices)}
        predictions = sorted((p for part in all_gather_objects(predictions) for p in part), key=lambda p: order[p["index"]])
    return result, predictions


def missing_forwards(model, loader, filler, num_indices, world_size, batch_size):
    """Under FSDP2 every forward gathers weights with all ranks: a rank with fewer batches than rank 0
    (which holds the largest share) runs the filler batch that many more times, discarding the output."""
    if not is_sharded(model) or not num_indices:
        return []
    most = math.ceil(math.ceil(num_indices / world_size) / batch_size)
    return [next(iter(filler))] * (most - len(loader))


@torch.no_grad()
def evaluate_generation(model, conversations, indices, tokenizer, *, batch_size, device, precision="fp32",
                        num_workers=0, prefix="eval", rank=0, world_size=1, text_weight=1.0, image_weight=1.0):
    """Text loss / perplexity and image MSE of the generation task over conversations[indices], exact under
    torchrun like `evaluate`. Image MSE is taken at fixed t values (unified.EVAL_TIMES, cycled over the
    samples) with noise seeded by sample index, so checkpoints are compared on the same draws."""
    was_training = model.training
    model.eval()
    metrics = GenerationMetrics(text_weight, image_weight, device)
    spec = model.spec
    options = dict(train=False, seed=0)
    loader = make_generation_loader(conversations, indices[rank::world_size], tokenizer, spec, batch_size, num_workers,
                                    pin_memory=device.type == "cuda", **options)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            text, image = unified_losses(model, batch)
        n_text, n_image = target_counts(batch)
        metrics.update(text, n_text, image, n_image)
    filler = make_generation_loader(conversations, indices[:1], tokenizer, spec, 1, 0, **options)
    for batch in missing_forwards(model, loader, filler, len(indices), world_size, batch_size):
        with autocast(device, precision):
            unified_losses(model, {k: v.to(device) for k, v in batch.items()})
    model.train(was_training)
    return metrics.all_reduce().compute(prefix)


def data_key(val_files, options):
    """Fingerprint of what a checkpoint was evaluated on: files (size, mtime) and options (JSON-able)."""
    files = [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in val_files]
    blob = json.dumps([files, options], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def find_targets(path):
    """(run_dir, [checkpoint folders]) for a checkpoint folder or a run directory."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "classifier.json")) or os.path.isfile(os.path.join(path, SPEC_FILE)):
        return os.path.dirname(path) or ".", [path]
    found = [p for p in list_checkpoints(path) if os.path.isfile(os.path.join(p, "classifier.json"))
             or os.path.isfile(os.path.join(p, SPEC_FILE))]
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no classifier.json or {SPEC_FILE}) nor a run directory "
                                f"with checkpoint-* folders")
    return path, found


def still_to_evaluate(run_dir, targets, key, force, rank):
    """The checkpoint folders not yet evaluated on this data (all of them with --force), the same on every rank."""
    done = already_evaluated(run_dir) if rank == 0 else set()
    skip = all_gather_objects(sorted(os.path.basename(t) for t in targets if (os.path.basename(t), key) in done))[0]
    if force:
        return targets
    if rank == 0:
        for name in skip:
            print(f"{name}: already evaluated on this data (see {RESULTS_FILE}); --force to redo")
    return [t for t in targets if os.path.basename(t) not in skip]


def already_evaluated(run_dir):
    done = set()
    path = os.path.join(run_dir, RESULTS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    done.add((record["checkpoint"], record["data_key"]))
                except (json.JSONDecodeError, KeyError):
                    continue
    return done


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint-* folder or a run directory holding them")
    p.add_argument("--val_jsonl", nargs="+", help="validation files (default: those the run was trained with)")
    p.add_argument("--datasets", nargs="+", help="registry override: FILE.yaml/json or name=num_classes[:eval_ratio] ...")
    p.add_argument("--num_labels", type=int, help="head size override (must match the saved head)")
    p.add_argument("--label_space", choices=["shared", "disjoint"], help="label layout override")
    p.add_argument("--no_logits_masking", action="store_true", help="score all head rows (default: as trained)")
    p.add_argument("--partial", action="store_true", help="evaluate only each dataset's eval_ratio subset")
    p.add_argument("--batch_size", type=int, default=64, help="per process (default: 64)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (default: fp32)")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader processes per rank (default: 2)")
    p.add_argument("--seed", type=int, help="seed of the partial subset (default: the run's)")
    p.add_argument("--force", action="store_true", help="evaluate again checkpoints already evaluated on this data")
    p.add_argument("--predictions", metavar="FILE", help="write one JSON line per sample and checkpoint")
    p.add_argument("--dist", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: a full model per process, or FSDP2-sharded per block (default: ddp)")
    g = p.add_argument_group("generation checkpoints (--task generate)")
    g.add_argument("--judge", metavar="CLASSIFIER", help="a classifier checkpoint of this codebase: its accuracy on "
                   "images generated from --judge_prompt for each of its classes, with and without guidance")
    g.add_argument("--judge_prompt", help="prompt per class, {label} is the class index, e.g. 'a handwritten digit {label}'")
    g.add_argument("--judge_dataset", help="which of the judge's datasets (default: its first)")
    g.add_argument("--judge_samples", type=int, default=10, help="images per class (default: 10)")
    g.add_argument("--sample_steps", type=int, default=50, help="Euler steps per image (default: 50)")
    g.add_argument("--cfg_scale", type=float, default=4.0, help="guidance scale compared with no guidance (default: 4)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed.run(run, args, (DataError, FileNotFoundError, ValueError))


def run(args, rank, world_size, device):
    run_dir, targets = find_targets(args.path)
    if os.path.isfile(os.path.join(targets[-1], SPEC_FILE)):
        return run_generation(args, run_dir, targets, rank, world_size, device)
    info = read_classifier_info(targets[-1])
    trained_args = read_info(targets[-1]).get("args", {})
    registry = load_registry(args.datasets or {n: {k: v for k, v in d.items() if k != "offset"}
                                                for n, d in info["datasets"].items()})
    label_space = LabelSpace.build(list(registry), [s.num_classes for s in registry.values()],
                                   args.label_space or info["label_space"], args.num_labels or info["num_labels"])
    if label_space.num_labels != info["num_labels"]:
        raise ValueError(f"--num_labels {label_space.num_labels} does not match the saved head ({info['num_labels']} rows)")
    masking = not (args.no_logits_masking or info.get("no_logits_masking", False))
    val_files = args.val_jsonl or trained_args.get("val_jsonl")
    if not val_files:
        raise ValueError("no validation data: give --val_jsonl (the run was trained without any)")
    seed = args.seed if args.seed is not None else trained_args.get("seed", 0)
    records = read_jsonl_files(val_files, registry)
    indices = partial_eval_indices(records, registry, seed) if args.partial else list(range(len(records)))
    if rank == 0:
        print(summarize(count_per_dataset(records, len(registry), indices), registry, "evaluation data"))
    key = data_key(val_files, [{n: vars(s) for n, s in registry.items()}, vars(label_space), masking, args.partial, seed])
    if args.predictions and rank == 0:
        open(args.predictions, "w").close()
    for folder in still_to_evaluate(run_dir, targets, key, args.force, rank):
        name = os.path.basename(folder)
        model, inputs, _ = load_classifier(folder)
        if args.dist == "fsdp" and world_size > 1:
            shard_model(model, fsdp_units(model.backbone), device,
                        param_dtype=torch.bfloat16 if args.precision == "bf16" else None)
        else:
            model.to(device)
        metrics, predictions = evaluate(model, records, indices, inputs, label_space,
                                        batch_size=args.batch_size, device=device, precision=args.precision,
                                        masking=masking, num_workers=args.num_workers, prefix="eval",
                                        rank=rank, world_size=world_size, with_predictions=bool(args.predictions))
        if rank != 0:
            continue
        print(format_table(metrics, "eval", label_space.names, f"{name} ({'partial' if args.partial else 'full'} evaluation)"))
        record = {"checkpoint": name, "step": checkpoint_step(folder), "data_key": key,
                  "val_jsonl": [os.path.abspath(p) for p in val_files], "partial": args.partial,
                  "time": datetime.datetime.now().isoformat(timespec="seconds"), **metrics}
        with open(os.path.join(run_dir, RESULTS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        if args.predictions:
            with open(args.predictions, "a") as f:
                for p in predictions:
                    r = records[p["index"]]
                    f.write(json.dumps({"checkpoint": name, "image_path": r.image_path,
                                        "dataset_name": label_space.names[r.dataset_id], "label": p["label"],
                                        "prediction": p["prediction"], "probability": p["probability"]}) + "\n")


def run_generation(args, run_dir, targets, rank, world_size, device):
    """eval.py over generation checkpoints: text loss / perplexity, image MSE at fixed t, and the judge."""
    trained_args = read_info(targets[-1]).get("args", {})
    val_files = args.val_jsonl or trained_args.get("val_jsonl")
    if not val_files:
        raise ValueError("no validation data: give --val_jsonl (the run was trained without any)")
    if args.dist == "fsdp" and world_size > 1:
        raise ValueError("--dist fsdp: generation checkpoints are evaluated with a full model per process")
    if args.judge and not args.judge_prompt:
        raise ValueError("--judge needs --judge_prompt, e.g. 'a handwritten digit {label}'")
    conversations = read_generation_files(val_files)
    judge = load_classifier(args.judge) if args.judge else None  # once for every checkpoint and guidance scale
    if judge:
        judge[0].to(device).eval()
    judged = ((args.judge, args.judge_prompt, args.judge_dataset, args.judge_samples, args.sample_steps, args.cfg_scale)
             if args.judge else None)
    key = data_key(val_files, ["generate", judged])
    for folder in still_to_evaluate(run_dir, targets, key, args.force, rank):
        name = os.path.basename(folder)
        model, tokenizer, info = load_unified(folder)
        model.to(device)
        metrics = evaluate_generation(model, conversations, list(range(len(conversations))), tokenizer,
                                      batch_size=args.batch_size, device=device, precision=args.precision,
                                      num_workers=args.num_workers, rank=rank, world_size=world_size,
                                      text_weight=info.get("text_loss_weight", 1.0),
                                      image_weight=info.get("image_loss_weight", 1.0))
        metrics.update(caption_accuracy(model, tokenizer, conversations, args.batch_size, rank, world_size, device))
        if args.judge:
            for scale in dict.fromkeys([1.0, args.cfg_scale]):
                metrics.update(judge_generated_images(model, tokenizer, judge, args, scale, rank, world_size, device))
        if rank != 0:
            continue
        print(format_generation(metrics, "eval", f"{name}"))
        if metrics["eval_captions"]:
            print(f"  captions: {100 * metrics['eval_caption_accuracy']:.1f}% exactly right "
                  f"({metrics['eval_captions']} image -> text samples, greedy)")
        if args.judge:
            print("  judge accuracy: " + ", ".join(f"{k[len('judge_accuracy_'):]} {100 * v:.1f}%"
                                                    for k, v in metrics.items() if k.startswith("judge_accuracy_"))
                  + f" (chance {100 * metrics['judge_chance']:.1f}%)")
        record = {"checkpoint": name, "step": checkpoint_step(folder), "data_key": key,
                  "val_jsonl": [os.path.abspath(p) for p in val_files],
                  "time": datetime.datetime.now().isoformat(timespec="seconds"), **metrics}
        with open(os.path.join(run_dir, RESULTS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")


def caption_accuracy(model, tokenizer, conversations, batch_size, rank, world_size, device):
    """Share of image -> text samples (one user image, then the assistant's text) whose greedy caption
    equals the reference exactly: eval_caption_accuracy over eval_captions samples."""
    pairs = [(c.turns[0].value, c.turns[1].value.strip()) for c in conversations
             if [(t.role, t.kind) for t in c.turns] == [("user", "image"), ("assistant", "text")]][rank::world_size]
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images = [load_image(path, model.spec) for path, _ in chunk]
        longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text in chunk)
        captions = generate_text(model, tokenizer, images, max_new_tokens=longest + 1, device=device)
        correct += sum(caption.strip() == text for caption, (_, text) in zip(captions, chunk))
    correct, total = all_reduce_sum([correct, len(pairs)], device)
    return {"eval_caption_accuracy": correct / total if total else 0.0, "eval_captions": int(total)}


@torch.no_grad()
def judge_generated_images(model, tokenizer, judge, args, cfg_scale, rank, world_size, device):
    """Generate judge_samples images per class of the judge's dataset and classify them with the judge
    (model, inputs, info of a classifier checkpoint).

    Returns judge_accuracy_cfg{scale}, judge_samples and judge_chance (1 / number of classes)."""
    judge, inputs, info = judge
    dataset = args.judge_dataset or next(iter(info["datasets"]))
    if dataset not in info["datasets"]:
        raise ValueError(f"--judge_dataset {dataset}: the judge knows {', '.join(info['datasets'])}")
    k, offset = info["datasets"][dataset]["num_classes"], info["datasets"][dataset]["offset"]
    labels = [c for c in range(k) for _ in range(args.judge_samples)][rank::world_size]
    correct = 0
    for start in range(0, len(labels), 100):
        chunk = labels[start:start + 100]
        prompts = [args.judge_prompt.format(label=c) for c in chunk]
        images = generate_images(model, tokenizer, prompts, args.sample_steps, cfg_scale, seed=rank * 100_003 + start,
                                 device=device)
        batch = inputs([to_pil(x).convert("RGB") for x in images], [dataset] * len(chunk))
        logits = judge(**{n: v.to(device) for n, v in batch.items()})[:, offset:offset + k]
        correct += (logits.argmax(-1).cpu() == torch.tensor(chunk)).sum().item()
    correct, total = all_reduce_sum([correct, len(labels)], device)
    return {f"judge_accuracy_cfg{cfg_scale:g}": correct / total, "judge_samples": int(total), "judge_chance": 1 / k}


if __name__ == "__main__":
    main()
