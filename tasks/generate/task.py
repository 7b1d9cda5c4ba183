"""--task generate: one unified text + image generation model with a joint loss (its parts: the
modules beside this one).

GenerateTask overrides what differs from tasks/base.py's defaults. A batch's targets are its
samples, its target text tokens and its noised image tokens; the step loss is
  text_loss_weight * (CE summed over target text tokens / their global count)
  + image_loss_weight * (patch-mean MSE summed over noised image tokens / their global count).
With --vae the image tokens are patches of the frozen VAE's latents (model.encode_latent_batch).
"""
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from checkpoint import model_files_sample, resolve_resume
from distributed import all_reduce_sum
from ema import check_best_metric
from logs import say_once
from metrics import GenerationMetrics, format_generation
from model import load_classifier
from tasks.base import FlagNeeds, Task
from tasks.generate.batches import check_pack_tokens, make_generation_loader, target_counts
from tasks.generate.model import (
    SPEC_FILE,
    VAE_DIR,
    WEIGHTS_FILE,
    UnifiedModel,
    check_image_spec,
    load_language_model,
    load_unified,
    read_unified_info,
    save_unified,
    unified_losses,
)
from tasks.generate.patches import ImageSpec, load_image
from tasks.generate.records import read_generation_files
from tasks.generate.sampling import generate_images, generate_text, sampling_shift
from tasks.images import save_grid, to_pil
from tasks.latent import load_codec
from weights import file_map, folder_map

BEST_METRICS = ("total_loss", "text_loss", "image_loss", "text_perplexity")


@dataclass
class Data:
    train: list  # records.Conversation records, or None in eval.py
    val: list
    partial_indices: list  # the partial evaluation uses every validation sample
    spec: ImageSpec
    text_weight: float = 1.0
    image_weight: float = 1.0
    shift: float = 1.0
    cond_dropout: float = 0.0
    pack_tokens: int = None  # tokens per packed row (None: one padded sample per row)
    codec: object = None  # latent.LatentCodec of --vae (None: pixel space)
    names = ()  # no per-dataset counts


class GenerateTask(Task):
    """--task generate: unified text + image generation (the module's docstring)."""
    NAME = "generate"
    MODEL_FILE = SPEC_FILE
    DEFAULT_BEST_METRIC = "total_loss"
    COUNTS = ("samples", "text_tokens", "image_tokens")
    SHARED_FLAGS = frozenset({"image_channels", "image_size"})
    RESUME_MAY_CHANGE = frozenset({"sample_prompts", "samples_per_prompt", "sample_steps",
                                   "cfg_scale"})
    # A flag given that cannot act under the others is an error (config.flag_errors).
    FLAG_NEEDS: ClassVar[FlagNeeds] = {
        name: ("--sample_prompts", lambda a: a.sample_prompts)
        for name in ("samples_per_prompt", "sample_steps", "cfg_scale")}
    EVAL_FLAG_NEEDS: ClassVar[FlagNeeds] = {
        name: ("--judge", lambda a: a.judge)
        for name in ("judge_prompt", "judge_dataset", "judge_samples", "sample_steps",
                     "cfg_scale")}

    def add_flags(self, parser):
        """train.py's flags of the generator: loss weights, image tokens, sampling, packing."""
        a = parser.add_argument
        a("--text_loss_weight", type=float, default=1.0,
          help="weight of the text cross-entropy")
        a("--image_loss_weight", type=float, default=1.0,
          help="weight of the image flow-matching MSE")
        a("--patch_size", type=int, default=4,
          help="pixels per image token side (with --vae: latent pixels)")
        a("--vae",
          help="a local diffusers AutoencoderKL folder (e.g. a --task autoencoder checkpoint): "
               "images become patches of its scaled latents, samples are decoded by it; frozen "
               "(pip install -e '.[vae]')")
        a("--timestep_shift", type=float, default=1.0,
          help="shift s of t -> s t / (1 + (s - 1) t), > 1 noisier")
        a("--cond_dropout", type=float, default=0.1,
          help="share of samples whose images do not see the text")
        a("--sample_prompts", nargs="+",
          help="at the end, write samples.png with a row of images per prompt")
        a("--samples_per_prompt", type=int, default=8,
          help="images per prompt in samples.png")
        a("--sample_steps", type=int, default=50, help="Euler steps from noise to image")
        a("--pack_tokens", type=int,
          help="pack several samples into each row of at most this many tokens (attention "
               "stays within a sample) instead of one padded sample per row")
        a("--cfg_scale", type=float, default=4.0,
          help="classifier-free guidance scale of samples.png (1: none)")

    def add_eval_flags(self, parser):
        """eval.py's flags of generation checkpoints: the judge of generated images."""
        a = parser.add_argument
        a("--judge", metavar="CLASSIFIER",
          help="a classifier checkpoint of this codebase: its accuracy on images generated from "
               "--judge_prompt for each of its classes, with and without guidance")
        a("--judge_prompt",
          help="prompt per class, {label} is the class index, e.g. 'a handwritten digit {label}'")
        a("--judge_dataset", help="which of the judge's datasets (default: its first)")
        a("--judge_samples", type=int, default=10, help="images per class")
        a("--sample_steps", type=int, default=50, help="Euler steps per image")
        a("--cfg_scale", type=float, default=4.0, help="guidance scale compared with no guidance")

    def load_data(self, args, say):
        """Read and check every record of every file before the first step."""
        train = read_generation_files(args.train_data, training=True)
        val = read_generation_files(args.val_data) if args.val_data else None
        check_flags(args)
        say(f"training data: {len(train):,} samples" +
            (f"; validation: {len(val):,}" if val else ""))
        codec = load_codec(args.vae) if args.vae else None
        spec = ImageSpec(args.image_size, args.patch_size, args.image_channels,
                         codec.latent_channels if codec else 0, codec.downsample if codec else 1)
        check_image_spec(spec, codec)
        check_resume_spec(args, spec)
        if codec:
            size = args.image_size // codec.downsample
            say(f"latent space: --vae {args.vae} encodes {args.image_size}x{args.image_size} "
                f"images into {codec.latent_channels}x{size}x{size} latents ({codec.scaling}), "
                f"frozen; {spec.grid ** 2} tokens of {spec.patch_dim} values each")
        return Data(train, val, list(range(len(val))) if val else [], spec, args.text_loss_weight,
                    args.image_loss_weight, args.timestep_shift, args.cond_dropout, codec=codec)

    def build_model(self, args, data, dtype, meta=False):
        """(model, backbone, inputs): the unified model, its causal LM, and the LM's tokenizer.
        meta: the LM of a model folder with its parameters on the meta device."""
        lm, tokenizer = load_language_model(args.model, args.seed, dtype, meta=meta)
        if args.pack_tokens is not None:  # a sample too long for a row: named before any step
            for records in (data.train, data.val or []):
                check_pack_tokens(records, tokenizer, data.spec, args.pack_tokens)
            data.pack_tokens = args.pack_tokens
        return UnifiedModel(lm, data.spec, data.codec).to(dtype=dtype), lm, tokenizer

    def loader(self, data, tokenizer, indices, *, train, batch_size, num_workers, pin_memory,
               seed=0, epoch=0, persistent=False, prefetch_factor=None):
        """Training batches draw noise, t and condition dropout from (seed, epoch, sample index);
        evaluation batches use the fixed t values of batches.EVAL_TIMES."""
        workers = {"persistent_workers": persistent, "prefetch_factor": prefetch_factor}
        if train:
            return make_generation_loader(data.train, indices, tokenizer, data.spec, batch_size,
                                          num_workers, pin_memory, data.pack_tokens, epoch=epoch,
                                          seed=seed, shift=data.shift,
                                          cond_dropout=data.cond_dropout, **workers)
        return make_generation_loader(data.val, indices, tokenizer, data.spec, batch_size,
                                      num_workers, pin_memory, data.pack_tokens, train=False,
                                      seed=0, **workers)

    def count_targets(self, batch):
        """Samples, target text tokens and noised image tokens (COUNTS)."""
        text_tokens, image_tokens = target_counts(batch)
        return {"samples": len(batch["indices"]), "text_tokens": text_tokens,
                "image_tokens": image_tokens}

    def forward(self, model, batch, data, train):
        """Summed text cross-entropy and image MSE, with the counts they are sums over."""
        text, image = unified_losses(model, batch)
        text_tokens, image_tokens = target_counts(batch)
        return {"text_sum": text, "text_count": text_tokens, "image_sum": image,
                "image_count": image_tokens}

    def step_loss(self, outputs, totals, args):
        """The weighted text CE and image MSE, each over its global count (the module docstring)."""
        return (args.text_loss_weight * outputs["text_sum"] / max(totals["text_tokens"], 1) +
                args.image_loss_weight * outputs["image_sum"] / max(totals["image_tokens"], 1))

    def new_metrics(self, data, args, device):
        """Text loss and perplexity, image MSE, their weighted total (metrics.GenerationMetrics)."""
        return GenerationMetrics(data.text_weight, data.image_weight, device)

    def report(self, metrics, prefix, title, data):
        """The losses; eval.py's caption and judge accuracies where measured."""
        lines = [format_generation(metrics, prefix, title)]
        if metrics.get(f"{prefix}_captions"):
            lines.append(f"  captions: {100 * metrics[f'{prefix}_caption_accuracy']:.1f}% exactly "
                         f"right ({metrics[f'{prefix}_captions']} image -> text samples, greedy)")
        judged = {k: v for k, v in metrics.items() if k.startswith("judge_accuracy_")}
        if judged:
            lines.append("  judge accuracy: " + ", ".join(
                f"{k[len('judge_accuracy_'):]} {100 * v:.1f}%" for k, v in judged.items()) +
                f" (chance {100 * metrics['judge_chance']:.1f}%)")
        return "\n".join(lines)

    def progress(self, metrics, prefix):
        """What the progress bar shows."""
        return {"loss": f"{metrics[f'{prefix}_total_loss']:.4f}"}

    # ------------------------------------------------------------------------- model files

    def save_model(self, folder, model, tokenizer, data, args, *, rank):
        """The LM in its own format + tokenizer, the image parts, unified.json; every process
        calls it."""
        save_unified(model, tokenizer, folder, {"text_loss_weight": data.text_weight,
                                                "image_loss_weight": data.image_weight,
                                                "timestep_shift": data.shift,
                                                "cond_dropout": data.cond_dropout}, rank)

    def load_model(self, folder, meta=False):
        """(UnifiedModel, tokenizer, unified.json) of a checkpoint folder."""
        return load_unified(folder, meta=meta)

    def weight_sources(self, model, folder, checkpoint):
        """Where each entry of the model is stored: the LM's in a model folder; with checkpoint,
        the image parts' too (unified.safetensors)."""
        found = folder_map(model.lm, folder, "lm.")
        if checkpoint:
            keys = [k for k in model.state_dict() if not k.startswith("lm.")]
            found.update(file_map(os.path.join(folder, WEIGHTS_FILE), keys))
        return found

    def check_evaluated_together(self, folders):
        """eval.py builds the model (the VAE with it) once for checkpoints whose own files agree:
        checkpoints of one run whose VAE differs (a resume with another --vae) would be decoded
        through the first one's. Refused instead, naming both."""
        vaes = [model_files_sample(os.path.join(f, VAE_DIR), also=("config.json",))
                for f in folders]
        for folder, vae in zip(folders, vaes):
            if vae != vaes[-1]:
                raise ValueError(f"{os.path.join(folder, VAE_DIR)} differs from "
                                 f"{os.path.join(folders[-1], VAE_DIR)}: the run changed its VAE "
                                 "(--vae) on a resume; evaluate each checkpoint on its own")

    def eval_data(self, args, folder, trained_args, world_size):
        """Data for eval.py: every validation conversation; the loss weights and image size saved
        with the checkpoint. Returns (data, indices, what results depend on, summary)."""
        if args.dist != "ddp" and world_size > 1:
            raise ValueError(f"--dist {args.dist}: generation checkpoints are evaluated with a "
                             "full model per process")
        if args.judge and not args.judge_prompt:
            raise ValueError("--judge needs --judge_prompt, e.g. 'a handwritten digit {label}'")
        info = read_unified_info(folder)
        val = read_generation_files(args.val_files)
        indices = list(range(len(val)))
        data = Data(None, val, indices, ImageSpec(**info["image"]),
                    info.get("text_loss_weight", 1.0), info.get("image_loss_weight", 1.0),
                    shift=sampling_shift(info, say=say_once) if args.judge else 1.0)
        judged = ((args.judge, args.judge_prompt, args.judge_dataset, args.judge_samples,
                   args.sample_steps, args.cfg_scale, data.shift) if args.judge else None)
        return data, indices, ["generate", judged], f"evaluation data: {len(val):,} samples"

    def eval_extras(self, args, device):
        """The judge classifier, loaded once for every checkpoint and guidance scale."""
        if not args.judge:
            return None
        judge, inputs, info = load_classifier(args.judge)
        judge.to(device).eval()
        return judge, inputs, info

    def extra_metrics(self, model, tokenizer, data, args, *, extras, rank, world_size, device):
        """Caption accuracy, and the judge's (extras) accuracy on generated images with and
        without CFG."""
        where = {"rank": rank, "world_size": world_size, "device": device}
        out = caption_accuracy(model, tokenizer, data.val, batch_size=args.batch_size, **where)
        if extras is not None:
            for scale in dict.fromkeys([1.0, args.cfg_scale]):
                out.update(judge_generated_images(model, tokenizer, extras, args, cfg_scale=scale,
                                                  shift=data.shift, **where))
        return out

    def finish(self, args, model, tokenizer, data, *, device, main_process):
        """samples.png: a row of images per --sample_prompts prompt from the evaluated weights."""
        if not args.sample_prompts:
            return
        if main_process and args.cond_dropout == 0 and args.cfg_scale != 1:
            print(f"note: samples.png is guided (--cfg_scale {args.cfg_scale:g}) from an "
                  "unconditional prediction this run never trained (--cond_dropout 0); "
                  "--cfg_scale 1 samples without guidance")
        prompts = [p for p in args.sample_prompts for _ in range(args.samples_per_prompt)]
        images = generate_images(model, tokenizer, prompts, args.sample_steps, args.cfg_scale,
                                 args.seed, args.timestep_shift, device)
        if main_process:
            path = os.path.join(args.output_dir, "samples.png")
            save_grid(images, path, args.samples_per_prompt)
            print(f"samples written to {path} (a row per prompt, cfg scale {args.cfg_scale}, "
                  f"{args.sample_steps} steps)")


def check_flags(args):
    """--best_metric and --cond_dropout."""
    if not args.no_best_tracking:
        check_best_metric(args.best_metric, BEST_METRICS)
    if not 0 <= args.cond_dropout < 1:
        raise ValueError(f"--cond_dropout must be in [0, 1), got {args.cond_dropout}")


def check_resume_spec(args, spec):
    """--resume a checkpoint whose image layers were built for other tokens: refused before any
    weight is read."""
    if not args.resume:
        return
    folder = resolve_resume(args.resume, args.output_dir)
    saved = ImageSpec(**read_unified_info(folder)["image"])
    if saved != spec:
        raise ValueError(
            f"--resume {folder}: its patch projection takes {saved.patch_dim} values per token "
            f"({saved}); these flags give {spec.patch_dim} ({spec})")


def caption_accuracy(model, tokenizer, conversations, *, batch_size, rank, world_size, device):
    """Share of image -> text samples (one user image, then the assistant's text) whose greedy
    caption equals the reference exactly: eval_caption_accuracy over eval_captions samples."""
    pairs = [(c.turns[0].value, c.turns[1].value.strip()) for c in conversations
             if [(t.role, t.kind) for t in c.turns] == [("user", "image"), ("assistant", "text")]]
    pairs = pairs[rank::world_size]
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images = [load_image(path, model.spec) for path, _ in chunk]
        longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                      for _, text in chunk)
        captions = generate_text(model, tokenizer, images, max_new_tokens=longest + 1,
                                 device=device)
        correct += sum(caption.strip() == text for caption, (_, text) in zip(captions, chunk))
    correct, total = all_reduce_sum([correct, len(pairs)], device)
    return {"eval_caption_accuracy": correct / total if total else 0.0, "eval_captions": int(total)}


@torch.no_grad()
def judge_generated_images(model, tokenizer, judge, args, *, cfg_scale, shift, rank,
                           world_size, device):
    """Generate judge_samples images per class of the judge's dataset and classify them with the
    judge (model, inputs, info of a classifier checkpoint).

    Returns judge_accuracy_cfg{scale}, judge_samples and judge_chance (1 / number of classes)."""
    judge, inputs, info = judge
    dataset = args.judge_dataset or next(iter(info["datasets"]))
    if dataset not in info["datasets"]:
        raise ValueError(
            f"--judge_dataset {dataset}: the judge knows {', '.join(info['datasets'])}")
    k, offset = info["datasets"][dataset]["num_classes"], info["datasets"][dataset]["offset"]
    labels = [c for c in range(k) for _ in range(args.judge_samples)][rank::world_size]
    correct = 0
    for start in range(0, len(labels), 100):
        chunk = labels[start:start + 100]
        prompts = [args.judge_prompt.format(label=c) for c in chunk]
        images = generate_images(model, tokenizer, prompts, args.sample_steps, cfg_scale,
                                 seed=rank * 100_003 + start, shift=shift, device=device)
        batch = inputs([to_pil(x).convert("RGB") for x in images], [dataset] * len(chunk))
        logits = judge(**{n: v.to(device) for n, v in batch.items()})[:, offset:offset + k]
        correct += (logits.argmax(-1).cpu() == torch.tensor(chunk)).sum().item()
    correct, total = all_reduce_sum([correct, len(labels)], device)
    return {f"judge_accuracy_cfg{cfg_scale:g}": correct / total, "judge_samples": int(total),
            "judge_chance": 1 / k}
