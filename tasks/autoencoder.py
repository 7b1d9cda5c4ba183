"""--task autoencoder: train a diffusers AutoencoderKL (optional extra: pip install -e '.[vae]'),
built from a preset or fine-tuned from a folder, on the images of the classifier's or the
generator's record files; its checkpoints are AutoencoderKL folders that --vae takes.

AutoencoderTask overrides what differs from tasks/base.py's defaults. A batch's targets are its
samples; the loss of a sample is
  recon + kl_weight * KL
  recon: mean over its pixel values of |x - x_hat| (--recon_loss l1) or (x - x_hat)^2 (mse)
  KL:    KL(q(z | x) || N(0, I)) summed over its latent values, divided by its number of pixel
         values (the per-value weighting of latent diffusion's VAEs: --kl_weight 1e-6 means what
         it means there)
and the step loss is their sum over the global sample count. Training decodes z = mean + std *
eps, with eps drawn per sample from (seed, epoch, sample index); evaluation decodes the posterior
mean and reports PSNR (pixels in [-1, 1], peak-to-peak 2) per dataset. Running averages of the
latents' mean and square give the scaling_factor (1 / std) and shift_factor (mean) written into
each checkpoint's config.json, so a generator on its latents sees them at unit scale.
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from backbone import eval_mode, restore_modes
from dataset import (
    DataError,
    DatasetSpec,
    EpochSampler,
    INDEX_DIR,
    count_per_dataset,
    load_registry,
    mixture_indices,
    plan_epochs,
    read_records,
    say_trained_in_val,
    start_worker,
    summarize,
    worker_options,
)
import ema
from metrics import PerDatasetSums
from tasks.base import Task, evaluated_indices, run_index_dir
from tasks.images import read_image, save_grid
from tasks.latent import autoencoder_class, downsampling, load_autoencoder
from weights import model_weights, write_safetensors

INFO_FILE = "autoencoder.json"  # the file that marks a checkpoint of the task
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # the name AutoencoderKL.from_pretrained reads
DEFAULT_DATASET = "images"  # the dataset of records without a dataset_name
RUNNING_MOMENTUM = 0.01  # of the latent mean / square averages, after a plain mean at the start
METRICS = ("loss", "recon_loss", "kl", "psnr")
PRESETS = {
    # 0.24M parameters: the demo digits
    "vae-tiny": {"block_out_channels": (16, 32, 32), "latent_channels": 4, "layers_per_block": 1},
    # the shape of FLUX's VAE (84M parameters, 16 latent channels, 1/8 size), random init
    "vae-flux": {"block_out_channels": (128, 256, 512, 512), "latent_channels": 16,
                 "layers_per_block": 2},
}


@dataclass
class ImageShape:
    """What a batch holds: images of size x size pixels, channels 1 or 3, and (training) noise of
    the latent's shape."""
    size: int
    channels: int
    latent_channels: int
    latent_size: int


@dataclass
class Data:
    registry: dict  # dataset name -> dataset.DatasetSpec (eval_ratio, sampling_weight)
    train: object  # data.types.RecordTable (labels unused), or None in eval.py
    val: object
    partial_indices: list
    recon_loss: str = "l1"
    kl_weight: float = 1e-6
    shares: list = None  # dataset shares of each epoch (None: by size)

    @property
    def names(self):
        return list(self.registry)


class AutoencoderTask(Task):
    """--task autoencoder: a diffusers AutoencoderKL (the module's docstring)."""
    NAME = "autoencoder"
    MODEL_FILE = INFO_FILE
    DEFAULT_BEST_METRIC = "overall_psnr"
    SHARED_FLAGS = frozenset({"datasets", "image_channels", "image_size", "mix_temperature",
                              "partial"})

    def add_flags(self, parser):
        """train.py's flags of the autoencoder: its loss and the shape of a new VAE."""
        a = parser.add_argument
        a("--recon_loss", choices=["l1", "mse"], default="l1",
          help="reconstruction loss, a mean over pixel values")
        a("--kl_weight", type=float, default=1e-6,
          help="weight of the KL to N(0, I), summed over latent values / pixel values")
        a("--vae_channels", type=int, nargs="+",
          help="--model preset:vae-*: channels of each encoder level (each level after the first "
               "halves the image)")
        a("--latent_channels", type=int, help="--model preset:vae-*: latent channels")

    def load_data(self, args, say):
        """Read and check every record before the first step; print the per-dataset summary."""
        check_flags(args)
        registry = load_registry(args.datasets) if args.datasets else {}
        index_dir = os.path.join(args.output_dir, INDEX_DIR)
        train = read_images(args.train_data, registry, bool(args.datasets), index_dir, say,
                            training=True)
        val = (read_images(args.val_data, registry, bool(args.datasets), index_dir, say)
               if args.val_data else None)
        check_best_metric(args, list(registry))
        partial, shares = plan_epochs(registry, train, val, args, say, "images")
        if val is not None:
            say_trained_in_val(val, train, registry, say)
        return Data(registry, train, val, partial, args.recon_loss, args.kl_weight, shares)

    def build_model(self, args, data, dtype, meta=False):
        """(model, backbone, inputs): the Autoencoder, its AutoencoderKL, and the batch's shape.
        Built whole even with meta: weight_sources says its files are read whole."""
        if args.model.startswith("preset:"):
            vae = autoencoder_class("--task autoencoder")(**vae_config(args))
        else:
            vae = load_autoencoder(args.model, "--model")
        vae = (vae if vae.dtype == dtype else vae.to(dtype)).train()
        f, config = downsampling(vae.config), vae.config
        if config.in_channels != args.image_channels or config.out_channels != args.image_channels:
            raise ValueError(f"--image_channels {args.image_channels}: --model {args.model} takes "
                             f"{config.in_channels}-channel images")
        if args.image_size % f:
            raise ValueError(f"--image_size {args.image_size} is not a multiple of {f}, the "
                             f"downsampling of --model {args.model}")
        shape = ImageShape(args.image_size, args.image_channels, config.latent_channels,
                           args.image_size // f)
        return Autoencoder(vae), vae, shape

    def loader(self, data, shape, indices, *, train, batch_size, num_workers, pin_memory, seed=0,
               epoch=0, persistent=False, prefetch_factor=None):
        """Images of data.train (with their latents' noise) or data.val at `indices`."""
        records = data.train if train else data.val
        return torch.utils.data.DataLoader(
            ImageNoiseDataset(records, shape, seed, train), batch_size=batch_size,
            sampler=EpochSampler(indices, epoch), num_workers=num_workers, pin_memory=pin_memory,
            worker_init_fn=start_worker,
            **worker_options(num_workers, persistent, prefetch_factor))

    def epoch_order(self, data, epoch, args, rank, world_size):
        """This rank's sample order of one epoch: by size, or drawn with the mixture's shares."""
        return mixture_indices(data.train.dataset_ids, data.shares, epoch, args.seed,
                               shuffle=not args.no_shuffle, rank=rank, world_size=world_size)

    def forward(self, model, batch, data, train):
        """Per-sample loss, reconstruction loss, KL and PSNR; the latents for their statistics."""
        x = batch["pixel_values"]
        recon, mean, logvar = model(x, batch["noise"] if train else None)
        error = recon.float() - x.float()
        recon_loss = (error.abs() if data.recon_loss == "l1" else error.pow(2)).flatten(1).mean(1)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float())
        kl = kl.flatten(1).sum(1) / x[0].numel()
        mse = (recon.float().clamp(-1, 1) - x.float()).pow(2).flatten(1).mean(1)
        psnr = 10 * torch.log10(4 / mse.clamp_min(1e-10))
        return {"losses": recon_loss + data.kl_weight * kl, "recon": recon_loss, "kl": kl,
                "psnr": psnr, "latents": mean, "dataset_ids": batch["dataset_ids"]}

    def new_metrics(self, data, args, device):
        """Per-dataset loss, reconstruction loss, KL and PSNR, and the latents' statistics."""
        return AutoencoderMetrics(data.names, device)

    def report(self, metrics, prefix, title, data):
        """A row per dataset and overall; the latents' mean and std."""
        rows = [n for n in [*data.names, "overall"] if f"{prefix}_{n}_samples" in metrics]
        width = max(len(r) for r in rows + ["dataset"])
        lines = [title, (f"  {'dataset':<{width}}  {'loss':>8}  {'recon':>8}  {'kl':>8}  "
                         f"{'psnr (dB)':>9}  {'samples':>9}")]
        for n in rows:
            lines.append(f"  {n:<{width}}  {metrics[f'{prefix}_{n}_loss']:8.4f}  "
                         f"{metrics[f'{prefix}_{n}_recon_loss']:8.4f}  "
                         f"{metrics[f'{prefix}_{n}_kl']:8.4f}  "
                         f"{metrics[f'{prefix}_{n}_psnr']:9.2f}  "
                         f"{metrics[f'{prefix}_{n}_samples']:9,}")
        if f"{prefix}_overall_latent_std" in metrics:
            mean, std = (metrics[f"{prefix}_overall_latent_{m}"] for m in ("mean", "std"))
            lines.append(f"  latents (posterior means): mean {mean:.4f}, std {std:.4f}")
        return "\n".join(lines)

    def progress(self, metrics, prefix):
        """What the progress bar shows."""
        return {"loss": f"{metrics[f'{prefix}_overall_loss']:.4f}",
                "psnr": f"{metrics[f'{prefix}_overall_psnr']:.2f}"}

    # ------------------------------------------------------------------------- model files

    def save_model(self, folder, model, shape, data, args, *, rank):
        """The AutoencoderKL as save_pretrained writes it (config.json with the measured latent
        scaling, diffusion_pytorch_model.safetensors): a folder --vae and from_pretrained take; and
        autoencoder.json. Every process calls it (model: as it holds it, FSDP2 shards too)."""
        scale, shift = model.latent_scaling()
        measured = {"scaling_factor": scale, "shift_factor": shift}
        if model.latent_moments[0] > 0:  # these replace a started-from VAE's per-channel ones
            measured.update(latents_mean=None, latents_std=None)
        model.vae.register_to_config(**measured)
        write_safetensors(os.path.join(folder, WEIGHTS_FILE), model_weights(model.vae), rank,
                          {"format": "pt"})
        if rank != 0:
            return
        model.vae.save_config(folder)
        info = {"image_size": shape.size, "image_channels": shape.channels,
                "recon_loss": data.recon_loss, "kl_weight": data.kl_weight,
                "datasets": {n: {"eval_ratio": s.eval_ratio} for n, s in data.registry.items()}}
        with open(os.path.join(folder, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)

    def load_model(self, folder, meta=False):
        """(Autoencoder, ImageShape, info) of a checkpoint folder; the running averages start from
        its config's scaling."""
        info = read_info(folder)
        vae = load_autoencoder(folder, "checkpoint")
        model = Autoencoder(vae)
        config = vae.config
        std, mean = 1 / config.scaling_factor, config.shift_factor or 0.0
        model.latent_moments.copy_(torch.tensor([1.0, mean, std ** 2 + mean ** 2]))
        f = downsampling(config)
        shape = ImageShape(info["image_size"], info["image_channels"], config.latent_channels,
                           info["image_size"] // f)
        return model, shape, info

    def eval_data(self, args, folder, trained_args, world_size):
        """Data for eval.py: the checkpoint's datasets (or --datasets) and loss settings."""
        info = read_info(folder)
        fixed = bool(args.datasets)
        registry = (load_registry(args.datasets) if fixed else
                    {n: DatasetSpec(n, 1, d["eval_ratio"]) for n, d in info["datasets"].items()})
        val = read_images(args.val_files, registry, fixed, run_index_dir(folder))
        seed, indices = evaluated_indices(args, trained_args, val, registry)
        data = Data(registry, None, val, indices, info["recon_loss"], info["kl_weight"])
        summary = summarize(count_per_dataset(val, len(registry), indices), registry,
                            "evaluation images")
        key = ["autoencoder", {n: s.eval_ratio for n, s in registry.items()}, info["recon_loss"],
               info["kl_weight"], args.partial, seed]
        return data, indices, key, summary

    @torch.no_grad()
    def finish(self, args, model, shape, data, *, device, main_process):
        """reconstructions.png: up to 8 validation images over their reconstructions (posterior
        mean) by the evaluated weights; and the latent scaling the checkpoints carry."""
        scale, shift = model.latent_scaling()
        if main_process:
            print(f"latent scaling of the last weights: scaling_factor {scale:.4f}, shift_factor "
                  f"{shift:.4f} (written into each checkpoint's config.json)")
        if not data.val:
            return
        dataset = ImageNoiseDataset(data.val, shape, train=False)
        images = torch.stack([dataset[i]["pixel_values"] for i in range(min(8, len(data.val)))])
        modes = eval_mode(model)
        recon = model(images.to(device))[0].float().clamp(-1, 1).cpu()
        restore_modes(modes)
        if main_process:
            path = os.path.join(args.output_dir, "reconstructions.png")
            save_grid(torch.cat([images, recon]), path, len(images))
            print(f"reconstructions written to {path} (top: validation images, bottom: decoded)")


def check_flags(args):
    if not 0 <= args.kl_weight < float("inf"):
        raise ValueError(f"--kl_weight must be a number >= 0, got {args.kl_weight}")
    if args.image_size < 1:
        raise ValueError(f"--image_size must be positive, got {args.image_size}")
    preset = args.model.startswith("preset:")
    if not preset and (args.vae_channels or args.latent_channels):
        raise ValueError("--vae_channels / --latent_channels shape a new VAE (--model "
                         f"preset:{'|preset:'.join(PRESETS)}); {args.model} has its own")


def check_best_metric(args, names):
    if args.no_best_tracking:
        return
    ema.check_best_metric(args.best_metric,
                          [f"{d}_{m}" for d in ["overall", *names] for m in METRICS])


# ----------------------------------------------------------------------------- records

def image_record(item):
    """(dataset name, [(image path, field)], label 0) of a JSON record: the classifier's line (its
    image_path) or the generator's record (its image_path, or the image turns of its
    conversations); without dataset_name it belongs to DEFAULT_DATASET."""
    if "conversations" in item:
        turns = item["conversations"]
        if not isinstance(turns, list):
            raise ValueError("field 'conversations': expected a list of turns")
        paths = [(t.get("image_path"), f"conversations[{i}].image_path")
                 for i, t in enumerate(turns) if isinstance(t, dict) and t.get("type") == "image"]
    elif "image_path" in item:
        paths = [(item["image_path"], "image_path")]
    else:
        paths = []
    if not paths:
        raise ValueError("a text-only record (no 'image_path', no image turn): --task autoencoder "
                         "trains on images")
    for path, field in paths:
        if not isinstance(path, str) or not path:
            raise ValueError(f"field '{field}': expected a non-empty string, got {path!r}")
    return item.get("dataset_name", DEFAULT_DATASET), paths, 0


def read_images(specs, registry, fixed, index_dir, say=print, training=False):
    """Every image of every record -> a data.types.RecordTable: JSON records (image_record) and the
    images of NAME=PATH sources (folders, Parquet, shards), their classes unused. fixed: names
    outside `registry` are errors; else they are added to it. training: the training split."""
    return read_records(specs, registry, labelled=False, fixed=fixed, jsonl_record=image_record,
                        index_dir=index_dir, say=say, training=training)


# ----------------------------------------------------------------------------- model

class Autoencoder(nn.Module):
    """An AutoencoderKL and running averages of its latents (posterior means) over training
    batches: [batches seen, mean, mean of squares], the scaling written with each checkpoint.
    The EMA model takes them as they are (NOT_AVERAGED): an average of them from their start
    [0, 0, 1] wrote a scaling near 1 into a short run's ema/config.json (1.32 against 3.50)."""
    NOT_AVERAGED = ("latent_moments",)

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.register_buffer("latent_moments", torch.tensor([0.0, 0.0, 1.0],
                                                            dtype=torch.float64))

    @property
    def backbone(self):  # what eval.py shards under --dist fsdp
        return self.vae

    def forward(self, pixel_values, noise=None):
        """(reconstruction, posterior mean, posterior log-variance); the decoder reads
        mean + std * noise, or the mean without noise."""
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
        if self.training:
            with torch.no_grad():
                m = self.latent_moments
                rate = max(RUNNING_MOMENTUM, 1 / (m[0].item() + 1))
                batch = torch.stack([posterior.mean.double().mean(),
                                     posterior.mean.double().pow(2).mean()])
                m[1:] += rate * (batch - m[1:])
                m[0] += 1
        # copies, not views of the encoder's output: FSDP2 warns about views it returns
        return self.vae.decode(z).sample, posterior.mean.clone(), posterior.logvar.clone()

    def latent_scaling(self):
        """(scaling_factor, shift_factor) = (1 / std, mean) of the running averages; the VAE's
        own before any training batch."""
        seen, mean, square = self.latent_moments.tolist()
        if not seen:
            return float(self.vae.config.scaling_factor), self.vae.config.shift_factor
        return 1 / math.sqrt(max(square - mean * mean, 1e-12)), mean


def vae_config(args):
    """The AutoencoderKL arguments of --model preset:NAME, --vae_channels, --latent_channels."""
    name = args.model.split(":", 1)[1]
    if name not in PRESETS:
        raise ValueError(f"--model {args.model}: unknown preset (known: "
                         f"{', '.join('preset:' + p for p in PRESETS)})")
    config = dict(PRESETS[name])
    if args.vae_channels:
        config["block_out_channels"] = tuple(args.vae_channels)
    if args.latent_channels:
        config["latent_channels"] = args.latent_channels
    channels = config["block_out_channels"]
    if min(channels) < 1 or config["latent_channels"] < 1:
        raise ValueError("--vae_channels / --latent_channels must be positive")
    levels = len(channels)
    return dict(config, in_channels=args.image_channels, out_channels=args.image_channels,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                norm_num_groups=math.gcd(32, *channels), sample_size=args.image_size,
                scaling_factor=1.0, shift_factor=0.0)


class ImageNoiseDataset(torch.utils.data.Dataset):
    """One image in [-1, 1] (and, for training, the noise of its latent, drawn from (seed, epoch,
    index): the same for any batch size, world size or resume point). Keys are (index, epoch)
    (dataset.EpochSampler), so persistent workers serve every epoch."""

    def __init__(self, records, shape, seed=0, train=True):
        self.records, self.shape = records, shape
        self.seed, self.train = seed, train

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            pixels = read_image(self.records.open(index), self.shape.size, self.shape.channels)
        except (DataError, OSError) as e:  # also a shard that cannot be read any more
            raise DataError(f"{self.records[index].source}: {e}") from None
        item = {"pixel_values": pixels, "dataset_ids": int(self.records.dataset_ids[index]),
                "indices": index}
        if self.train:
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            s = self.shape
            item["noise"] = torch.randn(s.latent_channels, s.latent_size, s.latent_size,
                                        generator=g)
        return item


class AutoencoderMetrics(PerDatasetSums):
    """Per-dataset sums of loss, reconstruction loss, KL, PSNR and samples, and of the latents'
    values, squares and count: all-reducible exactly, means taken when reported."""

    def __init__(self, names, device="cpu"):
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), 8, dtype=torch.float64, device=device)

    def update(self, losses, recon, kl, psnr, latents, dataset_ids):
        with torch.no_grad():
            z = latents.double().flatten(1)
            values = torch.stack([losses.double(), recon.double(), kl.double(), psnr.double(),
                                  torch.ones_like(losses, dtype=torch.float64), z.sum(1),
                                  z.pow(2).sum(1), torch.full_like(z[:, 0], z.shape[1])], 1)
            self.sums.index_add_(0, dataset_ids.to(self.sums.device), values.to(self.sums.device))

    def compute(self, prefix):
        """{prefix}_{dataset}_loss|recon_loss|kl|psnr|samples, the same for overall, and
        {prefix}_overall_latent_mean|latent_std."""
        out = {}
        rows = self.sums.cpu().tolist()
        for name, row in [*zip(self.names, rows), ("overall", self.sums.sum(0).cpu().tolist())]:
            count = row[4]
            if not count:
                continue
            out.update({f"{prefix}_{name}_{m}": v / count for m, v in zip(METRICS, row)})
            out[f"{prefix}_{name}_samples"] = int(count)
        total = self.sums.sum(0).cpu().tolist()
        if total[7]:
            mean = total[5] / total[7]
            out[f"{prefix}_overall_latent_mean"] = mean
            out[f"{prefix}_overall_latent_std"] = math.sqrt(max(total[6] / total[7] - mean ** 2,
                                                                0.0))
        return out


def read_info(folder):
    path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not an autoencoder checkpoint: {INFO_FILE} is "
                                "missing")
    with open(path) as f:
        return json.load(f)
