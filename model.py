"""The masked classifier: a Hugging Face backbone, a pooled feature, one linear head.

Backbones are vision models (ViT, ResNet, ConvNeXt, the vision tower of CLIP/SigLIP) fed
pixel_values, or vision-language models (Qwen2-VL, Qwen2.5-VL and other image-text-to-text
models) fed a short prompt with the image's placeholder tokens; for those the LM head is
dropped and the head sits on the last (or mean) hidden state of the valid tokens.

One head serves every dataset. In the `shared` label layout the head has
max(num_classes) rows and class i of every dataset lives on row i; in the
`disjoint` layout each dataset owns its own slice of rows (offsets in registry
order). Either way a sample may only predict rows inside its own dataset's
slice: `mask_logits` sets every other row to -inf.
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file

# Per-shard progress bars of save_pretrained / from_pretrained would interleave with the training
# bar.
transformers.utils.logging.disable_progress_bar()
# DataLoader workers fork after the tokenizer has run in the main process.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class LoadingOptions:
    """How model folders are loaded; set once per process from the command line."""
    trust_remote_code: bool = False  # may a folder run its own Python code (auto_map)
    # --attn_implementation; None: transformers' default, sdpa where the model has it, else eager
    attn_implementation: str = None


LOADING = LoadingOptions()

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
POOLINGS = ("auto", "pooler", "cls", "mean", "last")
DEFAULT_PROMPT = "Classify this {dataset} image."
# every other batch key is a backbone input
BATCH_TARGETS = ("labels", "dataset_ids", "indices", "soft_targets")

# Fresh random-init backbones for the demo and benchmarks (nothing can be downloaded).
# Each entry: transformers config class name, its kwargs, and the input size in pixels.
PRESETS = {
    "resnet-tiny": ("ResNetConfig",
                    dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64,
                                                                          128], depths=[1, 1, 1],
                         layer_type="basic", downsample_in_first_stage=False), 32),
    "vit-tiny": ("ViTConfig",
                 dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=512, image_size=32, patch_size=4), 32),
    "convnext-tiny": ("ConvNextConfig",
                      dict(num_channels=3, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                           num_stages=3, patch_size=2), 32),
    # ViT-L/16 (304M parameters) for throughput and memory checks on GPUs, e.g. with --dist fsdp
    "vit-large": ("ViTConfig",
                  dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, image_size=224, patch_size=16), 224),
}


@dataclass
class LabelSpace:
    """Where each dataset's classes live in the head: rows [offset, offset + num_classes)."""
    names: list
    num_classes: list
    offsets: list
    num_labels: int
    layout: str

    @classmethod
    def build(cls, names, num_classes, layout="shared", num_labels=None):
        if layout == "shared":
            offsets, needed = [0] * len(num_classes), max(num_classes)
        elif layout == "disjoint":
            offsets = [sum(num_classes[:i]) for i in range(len(num_classes))]
            needed = sum(num_classes)
        else:
            raise ValueError(f"--label_space must be 'shared' or 'disjoint', got {layout!r}")
        if num_labels is None:
            num_labels = needed
        elif num_labels < needed:
            raise ValueError(
                f"--num_labels {num_labels} is smaller than the {needed} head rows that the "
                f"{layout!r} layout needs for datasets {dict(zip(names, num_classes))}")
        return cls(list(names), list(num_classes), offsets, num_labels, layout)

    def tensors(self, device):
        """Per-dataset (num_classes, offsets) tensors, indexed by dataset id."""
        return (torch.tensor(self.num_classes,
                             device=device), torch.tensor(self.offsets, device=device))


def mask_logits(logits, num_classes_per_sample, offsets_per_sample=None):
    """Set every logit outside [offset, offset + num_classes) of each sample's dataset to -inf.

    Masked rows then never win argmax and get probability exactly 0.
    """
    rows = torch.arange(logits.shape[-1], device=logits.device)
    low = torch.zeros_like(
        num_classes_per_sample) if offsets_per_sample is None else offsets_per_sample
    valid = (rows[None, :] >= low[:, None]) & (rows[None, :] < (low + num_classes_per_sample)[:,
                                                                                              None])
    return logits.masked_fill(~valid, float("-inf"))


def is_vision_language(config):
    """Image-text-to-text models (Qwen2-VL, Qwen2.5-VL, LLaVA, ...); CLIP/SigLIP are two-tower
    vision
    models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def backbone_feature_dim(config):
    if is_vision_language(config):
        config = config.get_text_config()
    for name in ("hidden_size", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    raise ValueError(
        f"cannot tell the feature size of a {type(config).__name__}: it has no hidden_size or "
        "hidden_sizes"
    )


ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


def check_attn_implementation(value):
    """--attn_implementation before anything loads: flash_attention_2 needs its package and a GPU.
    """
    if value is None:
        return
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)},"
                         f" got {value!r}")
    if value != "flash_attention_2":
        return
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn_implementation flash_attention_2 needs the flash-attn package, "
                         "which is not installed (pip install flash-attn --no-build-isolation); "
                         "use sdpa or eager")
    if not torch.cuda.is_available():
        raise ValueError("--attn_implementation flash_attention_2 needs a CUDA GPU and none is "
                         "visible; use sdpa or eager")


def attn_options(model_class, config):
    """The from_pretrained / from_config keyword of --attn_implementation ({}: transformers'
    default). A model class that lacks the implementation asked for is named here, before loading.
    """
    asked = LOADING.attn_implementation
    if asked is None:
        return {}
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: the concrete class
    if mapping is not None:
        model_class = mapping[type(config)] if type(config) in mapping else None
    supported = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    if model_class is not None and asked in supported and not getattr(model_class,
                                                                       supported[asked], False):
        raise ValueError(f"--attn_implementation {asked}: {model_class.__name__} does not support "
                         f"it (a model without attention layers takes only eager)")
    return {"attn_implementation": asked}


def say(message):
    """Print once per job: loading happens on every rank."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def from_pretrained(model_class, folder, **kwargs):
    """model_class.from_pretrained without transformers' load report; missing weights are reported
    here.

    Unused weights are expected: the LM head of a vision-language model, the text tower of CLIP.
    """
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True,
                                                  trust_remote_code=LOADING.trust_remote_code,
                                                  **kwargs)
    # a truncated or corrupt weights file: name it, not a frame deep inside the loader
    except Exception as e:
        raise ValueError(
            f"{folder}: cannot load the model weights ({type(e).__name__}: {e})"[:2000]) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing:
        say(f"warning: {folder}: weights missing from the folder, randomly initialised: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model


def load_backbone(name_or_path, seed=0, dtype=None, prompt=DEFAULT_PROMPT, min_pixels=None,
                  max_pixels=None, meta=False):
    """Return (backbone, inputs) from a local model folder or a `preset:NAME`.

    `inputs` turns PIL images into the backbone's forward arguments (ImageInputs or
    ImageTextInputs). A vision-language folder loads through AutoModel, which is the model
    without its LM head (Qwen2VLModel: vision tower + language trunk); for two-tower
    checkpoints (CLIP, SigLIP) only the vision tower is loaded, through its own model class.
    meta: a folder's backbone gets its parameters on the meta device, nothing read (FSDP2 shards
    it, then each rank reads its shards: weights.read_weights); a preset is built whole.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    preset = name_or_path.startswith("preset:")
    if not preset and not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"--model {name_or_path}: no such folder (use a local model folder or one of "
            f"{', '.join('preset:' + p for p in PRESETS)})")
    config = None if preset else AutoConfig.from_pretrained(
        name_or_path, trust_remote_code=LOADING.trust_remote_code)
    vision_language = config is not None and is_vision_language(config)
    if (min_pixels or max_pixels) and not vision_language:
        raise ValueError(f"--min_pixels / --max_pixels apply to vision-language image processors; "
                         f"{name_or_path} takes a fixed input size")
    if preset:
        backbone, inputs = build_preset(name_or_path.split(":", 1)[1], seed)
        say(f"attention: {backbone.config._attn_implementation}")
        return backbone.to(dtype) if dtype else backbone, inputs
    model_class = AutoModel
    if getattr(config, "vision_config", None) is not None and not vision_language:
        model_class = MODEL_MAPPING[type(config.vision_config)]
    if meta:
        backbone = build_empty(model_class, name_or_path, config, dtype)
    else:
        backbone = from_pretrained(model_class, name_or_path, **attn_options(model_class, config),
                                   **({"dtype": dtype} if dtype else {}))
    say(f"attention: {backbone.config._attn_implementation}")
    if vision_language:
        return backbone, ImageTextInputs.from_folder(name_or_path, config, prompt, min_pixels,
                                                     max_pixels)
    return backbone, ImageInputs(
        AutoImageProcessor.from_pretrained(name_or_path,
                                           trust_remote_code=LOADING.trust_remote_code))


def build_empty(model_class, folder, config, dtype=None, attention=None):
    """What from_pretrained(model_class, folder) builds, with its parameters on the meta device
    and nothing read: the same config, dtype (the folder's own where none is given), attention
    (`attention`, else --attn_implementation) and evaluation mode."""
    from weights import parameters_on_meta
    if getattr(model_class, "_model_mapping", None) is None:  # e.g. CLIP's vision tower class
        config = model_class.config_class.from_pretrained(
            folder, trust_remote_code=LOADING.trust_remote_code)
    dtype = dtype or config.dtype or torch.get_default_dtype()
    options = {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype,
               **({"attn_implementation": attention} if attention
                  else attn_options(model_class, config))}
    with parameters_on_meta():
        if getattr(model_class, "_model_mapping", None) is not None:
            model = model_class.from_config(config, trust_remote_code=LOADING.trust_remote_code,
                                            **options)
        else:
            model = model_class._from_config(config, **options)
    return model.eval()  # as from_pretrained returns it


def with_pixel_bounds(image_processor, min_pixels=None, max_pixels=None):
    """A copy of a Qwen2-VL-style image processor that resizes to [min_pixels, max_pixels] pixels.
    """
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    if not bounds:
        return image_processor
    bounded = type(image_processor).from_dict(image_processor.to_dict(), **bounds)
    size = getattr(bounded, "size", None)
    applied = (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None))
    if None in applied or applied != (min_pixels or applied[0], max_pixels or applied[1]):
        raise ValueError(
            f"--min_pixels / --max_pixels: {type(image_processor).__name__} has no pixel-count "
            "bounds"
        )
    if applied[0] > applied[1]:
        raise ValueError(f"--min_pixels {applied[0]} is larger than --max_pixels {applied[1]}")
    return bounded


def build_preset(name, seed=0):
    from transformers import AutoModel, ViTImageProcessorPil

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    config_class, kwargs, size = PRESETS[name]
    config = getattr(transformers, config_class)(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = AutoModel.from_config(config, **attn_options(AutoModel, config))
    # Plain resize + [-1, 1] scaling; the PIL backend needs no torchvision.
    image_processor = ViTImageProcessorPil(size={"height": size, "width": size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return backbone, ImageInputs(image_processor)


class ImageInputs:
    """Vision backbones: PIL images -> {"pixel_values"} with the model's image processor.

    recipe: the processor in the fast image path's terms (preprocess.pixel_recipe; None where
    the path cannot reproduce it); pixel_normalize: the matching on-device normalisation to
    give MaskedClassifier.
    """

    prompt = None

    def __init__(self, image_processor):
        from preprocess import PixelNormalize, pixel_recipe
        self.image_processor = image_processor
        self.recipe = pixel_recipe(image_processor)
        self.pixel_normalize = PixelNormalize(self.recipe) if self.recipe is not None else None

    def __call__(self, images, dataset_names):
        return {
            "pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        }

    def save_pretrained(self, folder):
        self.image_processor.save_pretrained(folder)


class ImageTextInputs:
    """Vision-language backbones: PIL images + a prompt per sample -> the model's forward arguments.

    The text is the folder's chat template applied to one user turn (the image, then the
    prompt, with {dataset} replaced by the sample's dataset name) and the assistant turn
    opened, or `<vision_start><image><vision_end>prompt` without a template. The folder's
    AutoProcessor builds the batch where it loads; where it cannot (its video processor needs
    torchvision), the image processor + tokenizer do the same: the one image placeholder is
    repeated grid_t * grid_h * grid_w / merge_size**2 times, and mm_token_type_ids marks those
    tokens with 1 (Qwen2-VL's multimodal RoPE is built from it).
    """

    def __init__(self, image_processor, tokenizer, config, prompt=DEFAULT_PROMPT, processor=None,
                 chat_template=None):
        self.image_processor, self.tokenizer, self.processor = image_processor, tokenizer, processor
        self.prompt = prompt or DEFAULT_PROMPT
        self.image_token_id = config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        if self.image_token is None or tokenizer.convert_tokens_to_ids(
                self.image_token) != config.image_token_id:
            raise ValueError(
                f"the tokenizer has no token for the model's image_token_id {config.image_token_id}"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = chat_template
        markers = [getattr(config, "vision_start_token_id", None), config.image_token_id,
                   getattr(config, "vision_end_token_id", None)]
        self.image_marker = "".join(
            tokenizer.convert_ids_to_tokens(i) for i in markers if i is not None)
        if processor is None and getattr(image_processor, "merge_size", None) is None:
            raise ValueError(
                f"{type(image_processor).__name__} returns no image grid: without the model's "
                f"AutoProcessor the image placeholders cannot be expanded")
        self.texts = {}

    @classmethod
    def from_folder(cls, folder, config, prompt=DEFAULT_PROMPT, min_pixels=None, max_pixels=None):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
        try:
            processor = AutoProcessor.from_pretrained(folder,
                                                      trust_remote_code=LOADING.trust_remote_code)
        except Exception as e:  # e.g. Qwen2-VL's video processor needs torchvision
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            say(f"note: AutoProcessor cannot load {folder} ({reason}); using its image processor "
                "and tokenizer"
                )
            processor = None
        if processor is not None:
            processor.image_processor = with_pixel_bounds(processor.image_processor, min_pixels,
                                                          max_pixels)
            image_processor, tokenizer = processor.image_processor, processor.tokenizer
        else:
            image_processor = with_pixel_bounds(
                AutoImageProcessor.from_pretrained(folder,
                                                   trust_remote_code=LOADING.trust_remote_code),
                min_pixels, max_pixels)
            tokenizer = AutoTokenizer.from_pretrained(folder,
                                                      trust_remote_code=LOADING.trust_remote_code)
        chat_template = getattr(processor, "chat_template", None) or read_chat_template(folder)
        return cls(image_processor, tokenizer, config, prompt, processor, chat_template)

    def text(self, dataset_name):
        if dataset_name not in self.texts:
            prompt = self.prompt.replace("{dataset}", dataset_name)
            if self.tokenizer.chat_template:
                turn = [{
                    "role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]
                }]
                text = self.tokenizer.apply_chat_template(turn, tokenize=False,
                                                          add_generation_prompt=True)
            else:
                text = self.image_marker + prompt
            if text.count(self.image_token) != 1:
                raise ValueError(
                    f"the prompt text must hold the image placeholder {self.image_token!r} exactly "
                    f"once, got {text!r} (check --prompt and the chat template)")
            self.texts[dataset_name] = text
        return self.texts[dataset_name]

    def __call__(self, images, dataset_names):
        texts = [self.text(name) for name in dataset_names]
        if self.processor is not None:
            return dict(self.processor(images=images, text=texts, padding=True,
                                       return_tensors="pt"))
        vision = self.image_processor(images=images, return_tensors="pt")
        counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        texts = [t.replace(self.image_token, self.image_token * n) for t, n in zip(texts, counts)]
        text = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            **text,
            **vision, "mm_token_type_ids": (text["input_ids"] == self.image_token_id).long()
        }

    def save_pretrained(self, folder):
        if self.processor is not None:
            self.processor.save_pretrained(folder)
        else:
            self.image_processor.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)


def read_chat_template(folder):
    """A processor-level chat template (chat_template.jinja / chat_template.json), if the folder has
    one."""
    jinja, blob = os.path.join(folder,
                               "chat_template.jinja"), os.path.join(folder, "chat_template.json")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    if os.path.isfile(blob):
        with open(blob) as f:
            return json.load(f).get("chat_template")
    return None


def pool_tokens(hidden, attention_mask, pooling):
    """Last valid token or mean over valid tokens; right padding (1 1 0) and left padding (0 1 1)
    alike.

    attention_mask.sum(1) - 1 would be the last token only under right padding.
    """
    if pooling == "last":
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


class MaskedClassifier(nn.Module):
    """backbone -> pooled feature -> Linear(num_labels). Masking is applied by the caller."""

    def __init__(self, backbone, num_labels, pooling="auto", pixel_normalize=None):
        super().__init__()
        # uint8 pixel_values (the fast image path) -> normalised floats on the device; not state
        self.pixel_normalize = pixel_normalize
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
        self.token_inputs = is_vision_language(backbone.config)
        name = type(backbone).__name__
        if self.token_inputs and pooling in ("pooler", "cls"):
            raise ValueError(
                f"--pooling {pooling}: {name} is a vision-language model; use --pooling last or "
                "mean"
            )
        if not self.token_inputs and pooling == "last":
            raise ValueError(
                f"--pooling last is for vision-language backbones; {name} takes pooler, cls or mean"
            )
        self.backbone = backbone
        self.pooling = ("last" if self.token_inputs else "auto") if pooling == "auto" else pooling
        self.head = nn.Linear(backbone_feature_dim(backbone.config), num_labels,
                              dtype=backbone.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, outputs):
        pooled = getattr(outputs, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)  # ResNet's pooler output is (B, C, 1, 1)
        if self.pooling == "pooler":
            raise ValueError(
                f"{type(self.backbone).__name__} returns no pooler_output; use --pooling cls or "
                "mean"
            )
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # convolutional feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)

    def features(self, **inputs):
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            if self.pixel_normalize is None:
                raise ValueError("uint8 pixel_values (the fast image path) need the processor's "
                                 "normalisation: MaskedClassifier(..., pixel_normalize="
                                 "inputs.pixel_normalize)")
            pixels = self.pixel_normalize(pixels, self.head.weight.dtype)
            inputs = {**inputs, "pixel_values": pixels}
        if self.token_inputs:
            outputs = self.backbone(**inputs, use_cache=False)
            return pool_tokens(outputs.last_hidden_state, inputs["attention_mask"], self.pooling)
        return self.pool(self.backbone(**inputs))

    def forward(self, **inputs):
        return self.head(self.features(**inputs))


def enable_activation_checkpointing(backbone):
    """Recompute each block's activations in backward (non-reentrant: frozen inputs need no grad
    hooks)."""
    if hasattr(backbone, "enable_gradient_checkpointing"):  # diffusers models (non-reentrant)
        if not backbone._supports_gradient_checkpointing:
            raise ValueError(f"--gradient_checkpointing: {type(backbone).__name__} does not "
                             "support it")
        backbone.enable_gradient_checkpointing()
        return
    if not backbone.supports_gradient_checkpointing:
        raise ValueError(f"--gradient_checkpointing: {type(backbone).__name__} does not support it")
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        backbone.activation_checkpointing_enable({"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


def vision_language_parts(backbone):
    """(vision tower, language trunk) of a vision-language backbone, found by the names transformers
    uses."""
    vision = next((getattr(backbone, n) for n in ("visual", "vision_tower", "vision_model")
                   if isinstance(getattr(backbone, n, None), nn.Module)), None)
    language = getattr(backbone, "language_model", None)
    if vision is None or not isinstance(language, nn.Module):
        raise ValueError(
            f"{type(backbone).__name__}: cannot find its vision tower and language model")
    return vision, language


def set_trainable(model, freeze="none", train_only_head=False):
    """Freeze parts of the backbone; returns (trainable, total) parameter counts.

    --freeze vision: a vision-language model's vision tower (for a vision backbone: all of it);
    --freeze llm: its language trunk; --train_only_head: everything but the head (linear probe).
    """
    if train_only_head:
        model.backbone.requires_grad_(False)
    elif freeze == "vision":
        (vision_language_parts(model.backbone)[0]
         if model.token_inputs else model.backbone).requires_grad_(False)
    elif freeze == "llm":
        if not model.token_inputs:
            raise ValueError(f"--freeze llm: {type(model.backbone).__name__} has no language model")
        vision_language_parts(model.backbone)[1].requires_grad_(False)
    elif freeze != "none":
        raise ValueError(f"--freeze must be vision, llm or none, got {freeze!r}")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fsdp_units(backbone):
    """Modules to shard one at a time before the root (FSDP2 `fully_shard`), in order.

    A vision-language model's vision tower is one unit (one all-gather for a small encoder);
    every other unit is a transformer block: a member of one of the model's own layer lists
    whose class is in its `_no_split_modules`. A block inside another (ConvNeXt's layers in
    its stages) goes with the outer one. A model without such lists (ResNet) has no units:
    it is sharded whole, as the root.
    """
    vision = vision_language_parts(backbone)[0] if is_vision_language(backbone.config) else None
    inside = set(vision.modules()) if vision is not None else set()
    blocks = set(backbone._no_split_modules or ())
    units = [vision] if vision is not None else []
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and module not in inside:
            for block in module:
                if type(block).__name__ in blocks and block not in inside:
                    units.append(block)
                    inside.update(block.modules())
    return units


def save_classifier(model, inputs, folder, classifier_info, state_dict=None):
    """Write the backbone in its own HF format, its processor files, the head and the label layout.

    state_dict: the whole model's full weights when `model` holds only shards of them (FSDP)."""
    weights = state_dict if state_dict is not None else model.state_dict()
    part = lambda prefix: {k[len(prefix):]: v.detach().contiguous().cpu()  # noqa: E731
                           for k, v in weights.items() if k.startswith(prefix)}
    model.backbone.save_pretrained(folder, state_dict=part("backbone."), safe_serialization=True)
    inputs.save_pretrained(folder)
    save_file(part("head."), os.path.join(folder, HEAD_FILE))
    with open(os.path.join(folder, CLASSIFIER_FILE), "w") as f:
        json.dump(classifier_info, f, indent=2)


def read_classifier_info(folder):
    path = os.path.join(folder, CLASSIFIER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder} is not a classifier checkpoint: {CLASSIFIER_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:  # a truncated or corrupt file: name it
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: not a classifier description (a JSON object)")
    return info


def load_classifier(folder, pooling=None, meta=False):
    """Rebuild a MaskedClassifier and its inputs from a checkpoint folder (no pickle: safetensors +
    JSON). meta: the backbone's parameters on the meta device (see load_backbone)."""
    info = read_classifier_info(folder)
    backbone, inputs = load_backbone(folder, prompt=info.get("prompt"), meta=meta)
    model = MaskedClassifier(backbone, info["num_labels"], pooling or info.get("pooling", "auto"),
                             getattr(inputs, "pixel_normalize", None))
    load_head(model, folder)
    return model, inputs, info


def load_head(model, folder):
    path = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        model.head.load_state_dict(load_file(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot load the head ({type(e).__name__}: {e})") from None


def classify(model, batch, num_classes, offsets, masking=True):
    """One forward pass: (masked) logits and each sample's target row in the head.

    num_classes / offsets: per-dataset tensors indexed by batch["dataset_ids"].
    """
    dataset_ids = batch["dataset_ids"]
    logits = model(**{k: v for k, v in batch.items() if k not in BATCH_TARGETS})
    targets = offsets[dataset_ids] + batch["labels"]
    if masking:
        logits = mask_logits(logits, num_classes[dataset_ids], offsets[dataset_ids])
    return logits, targets


def autocast(device, precision):
    """Autocast for bf16 / fp16; a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision
                          != "fp32")


def train_mode(model):
    """Training mode for what trains. from_pretrained returns a model in eval mode: without this a
    folder's backbone would train with dropout off and BatchNorm on its running statistics (and
    Hugging Face layers skip gradient checkpointing). Modules whose parameters are all frozen (a
    frozen vision tower, a linear probe's backbone) stay in eval mode: their BatchNorm statistics
    and dropout do not move."""
    model.train()
    for module in model.modules():
        flags = [p.requires_grad for p in module.parameters()]
        if flags and not any(flags):
            module.eval()


def eval_mode(model):
    """Put the model in eval mode; returns every module's mode for restore_modes."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


def restore_modes(modes):
    for module, training in modes:
        module.training = training
