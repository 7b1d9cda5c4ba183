"""Hugging Face models as the loop runs them: loading a local folder or a preset (whole, or with
its parameters on the meta device), the inputs its processor builds from PIL images, its
structure (blocks, a vision-language model's vision tower and language model, FSDP units,
activation checkpointing) and the train / eval modes every task's model runs in.

Backbones are vision models (ViT, ResNet, ConvNeXt, the vision tower of CLIP/SigLIP) fed
what their image processor returns, or vision-language models (Qwen2-VL, LLaVA, Gemma3 and other
image-text-to-text models) fed a short prompt with the image's placeholder, through their
processor. docs/backbones.md lists the families tested.
"""
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn as nn
import transformers

from logs import say, say_once

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


DEFAULT_PROMPT = "Classify this {dataset} image."


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


def is_vision_language(config):
    """Image-text-to-text models (Qwen2-VL, Qwen2.5-VL, LLaVA, ...); CLIP/SigLIP are two-tower
    vision
    models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


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


class MissingWeights(ValueError):
    """A folder lacks weights of the backbone: training would start from random values there."""


def from_pretrained(model_class, folder, random_init=(), **kwargs):
    """model_class.from_pretrained without transformers' load report. Every weight the model
    expects must come from the folder: one that does not is an error naming the first few
    (transformers would initialise it at random, and fine-tuning random weights is never what a
    user asks for), unless it is in a part named in random_init (--random_init: a module name or
    prefix, e.g. `pooler`, which a ViTForImageClassification folder lacks), which is announced.
    A named part the folder holds whole is an error too (the flag would do nothing).

    Unused weights are expected: the LM head of a vision-language model, the text tower of CLIP.
    """
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True,
                                                  trust_remote_code=LOADING.trust_remote_code,
                                                  **kwargs)
    except ImportError as e:  # a family that needs a package (DiNAT: natten), not bad weights
        raise ValueError(f"{folder}: a package its model needs does not import here: "
                         f"{' '.join(str(e).split())}"[:2000]) from None
    # a truncated or corrupt weights file: name it, not a frame deep inside the loader
    except Exception as e:
        raise ValueError(
            f"{folder}: cannot load the model weights ({type(e).__name__}: {e})"[:2000]) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    inside = lambda key, part: key == part or key.startswith(part + ".")  # noqa: E731
    idle = [part for part in random_init if not any(inside(k, part) for k in missing)]
    if idle:
        raise ValueError(f"--random_init {' '.join(idle)}: {folder} lacks no weight of "
                         f"{type(model).__name__} there (it lacks {missing[:5] or 'none'})")
    refused = [k for k in missing if not any(inside(k, part) for part in random_init)]
    if refused:
        raise MissingWeights(
            f"{folder}: {len(refused)} weight(s) of {type(model).__name__} are not in the "
            f"folder: {refused[:5]}{' ...' if len(refused) > 5 else ''}; they would start from "
            "random values, so the folder is refused (--random_init PART starts a named part "
            "from random values on purpose)")
    if missing:
        say(f"note: {folder}: {len(missing)} weight(s) of {type(model).__name__} start from "
            f"random values, as --random_init asks: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}")
    return model


def output_fields(model_class):
    """The fields of the ModelOutput that model_class.forward is annotated to return (none where
    its annotation names none). An annotation that does not resolve is an error: what the model
    returns decides which of its parts is trained."""
    import dataclasses
    import typing
    from transformers.utils import ModelOutput
    try:
        returned = typing.get_type_hints(model_class.forward).get("return")
    except Exception as e:  # noqa: BLE001 - any failure to resolve it is reported alike
        raise ValueError(f"cannot read what {model_class.__name__}.forward returns, which "
                         f"decides whether its vision tower alone is trained: {e}") from None
    kinds = typing.get_args(returned) or (returned,)
    return {f.name for kind in kinds if isinstance(kind, type) and issubclass(kind, ModelOutput)
            for f in dataclasses.fields(kind)}


def trains_vision_tower(config):
    """Is a folder's backbone its vision tower alone? Two-tower checkpoints (CLIP, SigLIP, AIMv2,
    MetaCLIP 2), and image-text-to-text models whose model returns its vision outputs and no last
    hidden state (BLIP-2, InstructBLIP: their language model reads a Q-Former's query outputs,
    not image tokens in the prompt): what their image processor feeds is the vision tower."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    if getattr(config, "vision_config", None) is None:
        return False
    if not is_vision_language(config):
        return True
    if type(config) not in MODEL_MAPPING:
        return False
    fields = output_fields(MODEL_MAPPING[type(config)])
    return "vision_outputs" in fields and "last_hidden_state" not in fields


def vision_tower_of(folder, config):
    """(class, prefix) of the vision tower in a folder's whole model (AutoModel's class): the
    submodule whose config is the folder's vision_config, and the name the model keeps it under
    (CLIPModel: CLIPVisionModel under vision_model). Found on a copy built on the meta device
    (nothing read), so a tower class no auto class maps (MetaClip2VisionModel) is found too."""
    from transformers import AutoModel, PreTrainedModel
    whole = build_empty(AutoModel, folder, config, attention="eager")
    kind = type(config.vision_config)
    found = [(name, module) for name, module in whole.named_modules()
             if name and isinstance(module, PreTrainedModel) and type(module.config) is kind]
    if not found:
        raise ValueError(f"{folder}: {type(whole).__name__} holds no model of its vision_config "
                         f"({kind.__name__}), so its vision tower cannot be loaded alone")
    name, module = found[0]
    return type(module), name


def model_class_of(folder, config):
    """The class a folder's config loads as: AutoModel; else AutoBackbone's class (a backbone
    config AutoModel does not map: RTDetrResNetConfig); for a config no auto class maps (the vision
    tower of MetaCLIP 2 or BLIP-2 in a checkpoint of this project), the transformers class its
    config.json names (`architectures`) if that class takes this config; else an error."""
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_MAPPING
    if type(config) in MODEL_MAPPING or getattr(config, "auto_map", None):
        return AutoModel
    if type(config) in MODEL_FOR_BACKBONE_MAPPING:
        # AutoBackbone's class, called directly: AutoBackbone.from_pretrained asks the Hub
        # whether a local folder's path is a repository (transformers 5.25)
        return MODEL_FOR_BACKBONE_MAPPING[type(config)]
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if getattr(model_class, "config_class", None) is type(config):
            return model_class
    raise ValueError(f"{folder}: transformers maps no model class to {type(config).__name__} "
                     f"(model_type {config.model_type!r}) and no class that takes it is named in "
                     "its config.json (architectures)")


def fine_tuning_setting(backbone, name_or_path):
    """Put a backbone whose forward is random in eval mode too into its fine-tuning setting.

    ViTMAE keeps config.mask_ratio of the patches (0.75 in its checkpoints: 1 - 0.75 kept) after
    shuffling them by `noise`, drawn at random on every call unless given. The ratio is set to 0,
    as its model card says for fine-tuning, and each call gets ordered noise, so every patch is
    kept in its place (the plain ViT sequence). Dropout and stochastic depth (drop_path) are off
    in eval mode already (eval.py puts the model in it).

    Only a model that masks is touched: HieraModel keeps mask_ratio in its config but masks only
    when built for pre-training (`is_mae`), never as AutoModel builds it."""
    config = backbone.config
    if getattr(config, "mask_ratio", None) is None or "noise" not in forward_names(backbone):
        return
    maskers = [m for m in backbone.modules() if callable(getattr(m, "random_masking", None))]
    if not maskers:  # transformers renamed it: refused, rather than trained on dropped patches
        raise ValueError(f"{name_or_path}: {type(backbone).__name__} takes `noise` and its config "
                         f"a mask_ratio ({config.mask_ratio}), as ViTMAE, but none of its modules "
                         "has the random_masking method by which its masking is found here: "
                         "whether it drops patches cannot be told with this transformers version")
    if not any(getattr(m, "is_mae", True) for m in maskers):
        return
    if config.mask_ratio:
        # said on every load of such a folder: checkpoints are saved with the ratio 0
        say(f"note: {name_or_path}: {type(backbone).__name__} drops patches at random "
            f"(mask_ratio {config.mask_ratio}); set to 0, its fine-tuning setting, with the "
            "patches in order")
        config.mask_ratio = 0.0
    patch = config.patch_size
    height, width = (patch, patch) if isinstance(patch, int) else patch

    def ordered_noise(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if kwargs.get("noise") is None and pixels is not None:
            count = (pixels.shape[-2] // height) * (pixels.shape[-1] // width)
            order = torch.arange(count, device=pixels.device, dtype=torch.float32)
            kwargs["noise"] = order.expand(pixels.shape[0], count)
        return args, kwargs

    backbone.register_forward_pre_hook(ordered_noise, with_kwargs=True)


def load_backbone(name_or_path, seed=0, dtype=None, prompt=DEFAULT_PROMPT, min_pixels=None,
                  max_pixels=None, meta=False, random_init=()):
    """Return (backbone, inputs) from a local model folder or a `preset:NAME`.

    `inputs` turns PIL images into the backbone's forward arguments (ImageInputs or
    ImageTextInputs). A vision-language folder loads through AutoModel, which is the model
    without its LM head (Qwen2VLModel: vision tower + language trunk); for two-tower
    checkpoints (CLIP, SigLIP, AIMv2, MetaCLIP 2) and BLIP-2 / InstructBLIP only the vision tower
    is loaded, through its own model class, from under the prefix the whole model keeps it at
    (vision_tower_of). Every weight comes from the folder (from_pretrained), and a forward that is
    random in eval mode is put in its fine-tuning setting (fine_tuning_setting).
    meta: a folder's backbone gets its parameters on the meta device, nothing read (FSDP2 shards
    it, then each rank reads its shards: weights.read_weights); a preset is built whole.
    random_init: parts of the backbone that may start from random values where the folder lacks
    them (from_pretrained; on the meta device, weights.folder_map finds no weights for them and
    train.py builds the backbone whole).
    """
    from transformers import AutoConfig

    preset = name_or_path.startswith("preset:")
    if not preset and not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"--model {name_or_path}: no such folder (use a local model folder or one of "
            f"{', '.join('preset:' + p for p in PRESETS)})")
    config = None if preset else AutoConfig.from_pretrained(
        name_or_path, trust_remote_code=LOADING.trust_remote_code)
    tower = config is not None and trains_vision_tower(config)
    vision_language = config is not None and is_vision_language(config) and not tower
    if (min_pixels or max_pixels) and not vision_language:
        raise ValueError(f"--min_pixels / --max_pixels apply to vision-language image processors; "
                         f"{name_or_path} takes a fixed input size")
    if preset and random_init:
        raise ValueError(f"--random_init: {name_or_path} starts from random values whole")
    if preset:
        backbone, inputs = build_preset(name_or_path.split(":", 1)[1], seed)
        say(f"attention: {backbone.config._attn_implementation}")
        return backbone.to(dtype) if dtype else backbone, inputs
    model_class, key_mapping = model_class_of(name_or_path, config), None
    if tower:
        model_class, prefix = vision_tower_of(name_or_path, config)
        # the folder keeps the tower's weights under its prefix; transformers strips it for
        # CLIP and SigLIP, not for every tower (AIMv2's class keeps its modules at the top)
        key_mapping = {rf"^{re.escape(prefix)}\.": ""}
    if meta:
        backbone = build_empty(model_class, name_or_path, config, dtype)
    else:
        backbone = from_pretrained(model_class, name_or_path, random_init,
                                   **attn_options(model_class, config),
                                   **({"dtype": dtype} if dtype else {}),
                                   **({"key_mapping": key_mapping} if key_mapping else {}))
    backbone.folder_key_mapping = key_mapping  # weights.folder_map renames as from_pretrained
    if key_mapping and getattr(backbone, "_weight_conversions", None):
        # saving reverts the renamings loading applied: not this one, so a checkpoint keeps the
        # tower's own layout, which its class reads with no renaming
        backbone._weight_conversions = [
            t for t in backbone._weight_conversions
            if getattr(t, "_original_source_patterns", None) != list(key_mapping)]
    fine_tuning_setting(backbone, name_or_path)
    say(f"attention: {backbone.config._attn_implementation}")
    if vision_language:
        vision_language_parts(backbone)  # a family whose parts cannot be found stops here
        return backbone, ImageTextInputs.from_folder(name_or_path, backbone, prompt, min_pixels,
                                                     max_pixels)
    return backbone, ImageInputs(load_image_processor(name_or_path), forward_names(backbone))


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
    return backbone, ImageInputs(image_processor, forward_names(backbone))


def forward_names(backbone):
    """The arguments the backbone's forward takes by name: which processor outputs reach it
    (never `labels`, which PaliGemma's processor returns: the labels are the classifier's)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(name for name, p in inspect.signature(backbone.forward).parameters.items()
                 if p.kind in kinds and name != "labels")


def load_image_processor(folder):
    """The folder's image processor; one that only runs on torchvision (DINOv3's) is an error that
    says to install it."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(folder,
                                                  trust_remote_code=LOADING.trust_remote_code)
    except (ImportError, ValueError) as e:
        if "torchvision" not in str(e).lower():
            raise
        path, name = os.path.join(folder, "preprocessor_config.json"), "its image processor"
        if os.path.isfile(path):
            with open(path) as f:
                name = json.load(f).get("image_processor_type", name)
        raise ValueError(f"{folder}: {name} runs on torchvision only, which is not installed: "
                         "pip install torchvision") from None


def first_line(error):
    """The first sentence of an exception's message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]


def load_processor(folder, config):
    """(processor, names of the folder's files it did not load) of a vision-language folder.

    The folder's AutoProcessor where it loads. Where it does not (a video processor needs
    torchvision: Qwen-VL, InternVL, LLaVA-OneVision, SmolVLM; a checkpoint saved without one has
    no video processor file), the same processor class is built from the image processor and
    tokenizer alone: images go through the processor's own code, so the inputs are those the
    whole processor builds (the user is told once). Otherwise the error says what is missing.
    """
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    try:
        return AutoProcessor.from_pretrained(folder,
                                             trust_remote_code=LOADING.trust_remote_code), []
    except Exception as e:  # noqa: BLE001 - the processor built below, or an error that says why
        reason = first_line(e)
    processor_class = PROCESSOR_MAPPING[type(config)] if type(config) in PROCESSOR_MAPPING else None
    parts = processor_class.get_attributes() if processor_class is not None else []
    kept, left_out = parts[:2], parts[2:]
    image_processor = load_image_processor(folder)  # one that runs on torchvision only says so
    if kept != ["image_processor", "tokenizer"] or not all("video" in p for p in left_out):
        install = "; pip install torchvision" if "torchvision" in reason.lower() else ""
        raise ValueError(f"{folder}: cannot load its processor ({reason}){install}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder,
                                                  trust_remote_code=LOADING.trust_remote_code)
        # the class itself, told that its parts are the image processor and tokenizer
        images_only = type(processor_class.__name__, (processor_class,),
                           {"get_attributes": classmethod(lambda cls: list(kept))})
        settings, _ = processor_class.get_processor_dict(folder)
        processor = images_only.from_args_and_dict(
            [image_processor, tokenizer] + [None] * len(left_out), settings)
    except Exception as e:  # noqa: BLE001 - e.g. SmolVLM's processor needs num2words
        raise ValueError(f"{folder}: cannot build {processor_class.__name__} ({first_line(e)})"
                         ) from None
    say_once(f"note: {folder}: its {', '.join(left_out)} cannot load ({reason}); images go "
             f"through {processor_class.__name__} without it, which builds the same inputs")
    unloaded = [name for name in ("video_preprocessor_config.json",)
                if os.path.isfile(os.path.join(folder, name))]
    return processor, unloaded


class ImageInputs:
    """Vision backbones: PIL images -> what the image processor returns that the backbone's forward
    takes (pixel_values; SigLIP2's pixel_attention_mask and spatial_shapes too).

    recipe: the processor in the fast image path's terms (preprocess.pixel_recipe; None where the
    path cannot reproduce it, or where the processor gives more than pixel_values);
    pixel_normalize: the matching on-device normalisation, which MaskedClassifier takes from here.
    """

    prompt = None

    def __init__(self, image_processor, accepted=("pixel_values",)):
        from preprocess import PixelNormalize, pixel_recipe
        self.image_processor, self.accepted = image_processor, tuple(accepted)
        keys = set(self.example())
        if "pixel_values" not in keys:
            raise ValueError(f"{type(image_processor).__name__} gives no pixel_values that the "
                             f"backbone takes (its forward takes {', '.join(self.accepted)})")
        self.recipe = pixel_recipe(image_processor) if keys == {"pixel_values"} else None
        self.pixel_normalize = PixelNormalize(self.recipe) if self.recipe is not None else None

    def __call__(self, images, dataset_names):
        batch = self.image_processor(images=images, return_tensors="pt")
        return {k: v for k, v in batch.items() if k in self.accepted}

    def example(self):
        """The inputs of one blank image, for measuring what the backbone returns."""
        from PIL import Image
        return self([Image.new("RGB", (64, 64))], ["example"])

    def save_pretrained(self, folder):
        self.image_processor.save_pretrained(folder)


class ImageTextInputs:
    """Vision-language backbones: PIL images + a prompt per sample -> the model's forward arguments,
    built by the folder's processor (see load_processor).

    The text is the folder's chat template applied to one user turn (the image, then the prompt,
    with {dataset} replaced by the sample's dataset name) and the assistant turn opened; without
    a template, the image placeholder (between the model's vision start / end tokens where it has
    them), then the prompt. The placeholder is the processor's own (`image_token`; Gemma3's is
    <start_of_image>), which the processor expands into the image's tokens. Each image goes to the
    processor as a list of its own: one image per sample (Mllama, Gemma3 and Idefics3 read a flat
    list as one sample's images); a processor that refuses nested lists (GOT-OCR2, where they are
    the pages of one document) gets a flat list, one image per sample (reads_nested_images).
    What reaches the backbone is what the processor returns and its forward takes
    (mm_token_type_ids, token_type_ids, image grids, ...).
    """

    def __init__(self, processor, config, accepted, prompt=DEFAULT_PROMPT, chat_template=None,
                 source=None, unloaded=()):
        self.processor, self.accepted = processor, tuple(accepted)
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.prompt = prompt or DEFAULT_PROMPT
        self.source, self.unloaded = source, list(unloaded)  # files carried into checkpoints
        tokenizer = self.tokenizer
        # BLIP-2's processor keeps its placeholder as an AddedToken, not a string
        image_token = getattr(processor, "image_token", None)
        self.image_token = getattr(image_token, "content", image_token)
        if self.image_token is None or tokenizer.convert_tokens_to_ids(self.image_token) in (
                None, tokenizer.unk_token_id):
            raise ValueError(f"{type(processor).__name__}: its tokenizer has no image placeholder "
                             f"token ({self.image_token!r})")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = chat_template
        start, end = (getattr(config, f"vision_{edge}_token_id", None) for edge in ("start", "end"))
        self.image_marker = "".join([*tokenizer.convert_ids_to_tokens([start] if start else []),
                                     self.image_token,
                                     *tokenizer.convert_ids_to_tokens([end] if end else [])])
        self.texts = {}
        self.nested = self.reads_nested_images()

    def reads_nested_images(self):
        """Does the processor take one list of images per sample? Asked once, of two blank
        images: a processor that refuses the nested lists must take the flat list as one image
        per sample, two samples out, else its first error stands."""
        from PIL import Image
        images = [Image.new("RGB", (64, 64)) for _ in range(2)]
        texts = [self.text("example")] * 2
        try:
            self.processor(images=[[i] for i in images], text=texts, padding=True,
                           return_tensors="pt")
            return True
        except ValueError as e:
            refusal = e
        try:  # GOT-OCR2: nested lists are the pages of one document
            flat = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        except Exception:  # noqa: BLE001 - the nested call's error says what is wrong
            raise refusal from None
        # one image per sample: each row holds the same number of image tokens, none empty
        token = self.tokenizer.convert_tokens_to_ids(self.image_token)
        per_row = (flat["input_ids"] == token).sum(dim=1).tolist()
        if len(per_row) != len(images) or per_row[0] == 0 or len(set(per_row)) != 1:
            raise refusal
        return False

    @classmethod
    def from_folder(cls, folder, backbone, prompt=DEFAULT_PROMPT, min_pixels=None,
                    max_pixels=None):
        processor, unloaded = load_processor(folder, backbone.config)
        processor.image_processor = with_pixel_bounds(processor.image_processor, min_pixels,
                                                      max_pixels)
        chat_template = getattr(processor, "chat_template", None) or read_chat_template(folder)
        return cls(processor, backbone.config, forward_names(backbone), prompt, chat_template,
                   folder, unloaded)

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
        # a chat template that writes the BOS token itself (Gemma3, Mllama): the tokenizer must
        # not add another, as transformers' own apply_chat_template(tokenize=True) decides
        bos = self.tokenizer.bos_token
        once = {"add_special_tokens": False} if bos and texts[0].startswith(bos) else {}
        batch = self.processor(images=[[image] for image in images] if self.nested else
                               list(images), text=texts, padding=True, return_tensors="pt",
                               **once)
        return {k: v for k, v in batch.items() if k in self.accepted}

    def save_pretrained(self, folder):
        self.processor.save_pretrained(folder)
        # transformers 5 folds the image processor into processor_config.json; its own file too
        self.image_processor.save_pretrained(folder)
        for name in self.unloaded:  # with torchvision the checkpoint's processor loads whole
            shutil.copy(os.path.join(self.source, name), os.path.join(folder, name))


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
    """(vision tower, language model) of a vision-language backbone, as transformers names them
    (get_encoder("image"): visual, vision_tower, vision_model; get_decoder(): language_model,
    text_model). A model where they cannot be found is refused, naming its class."""
    vision, language = backbone.get_encoder(modality="image"), backbone.get_decoder()
    if vision is backbone or language is backbone or vision is language or not all(
            isinstance(m, nn.Module) for m in (vision, language)):
        raise ValueError(f"{type(backbone).__name__}: cannot find its vision tower and language "
                         "model, so it cannot be trained as a classifier here (docs/backbones.md "
                         "lists the families that can)")
    return vision, language


def meta_forward(backbone, batch):
    """backbone(**batch) on the meta device: the outputs' shapes, with no memory and no compute.

    Floating-point inputs go to the meta device; integer ones (image grids, SigLIP2's spatial
    shapes) stay real, since shapes follow their values; masks are left out (telling whether one
    is all ones needs its values, and a mask changes no shape)."""
    state = {name: torch.empty_like(t, device="meta")
             for name, t in chain(backbone.named_parameters(), backbone.named_buffers())}
    batch = {k: None if k.endswith("mask") else
             v.to("meta", backbone.dtype) if v.is_floating_point() else v
             for k, v in batch.items()}
    with torch.no_grad():
        return torch.func.functional_call(backbone, state, (), batch, strict=False)


def layer_blocks(backbone):
    """The backbone's blocks in order, as (name, module): the members of its own layer lists
    whose class is in its `_no_split_modules` (the discovery of fsdp_units; a block inside
    another goes with the outer one). A model whose lists hold no such class (ResNet) gets the
    members of its first layer list (its stages)."""
    kinds = set(backbone._no_split_modules or ())
    def is_block(m):  # by the names in its class's MRO: FSDP2 subclasses each unit's class
        return any(c.__name__ in kinds for c in type(m).__mro__)

    lists = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList)]
    blocks, inside = [], set()
    for name, modules in lists:
        if modules in inside:
            continue
        for i, block in enumerate(modules):
            if is_block(block) and block not in inside:
                blocks.append((f"{name}.{i}", block))
                inside.update(block.modules())
    if not blocks and lists:
        name, modules = lists[0]
        blocks = [(f"{name}.{i}", m) for i, m in enumerate(modules)]
    return blocks


def merger_of(backbone, vision):
    """The projector between a vision-language model's vision tower and its language model, or
    None: the one part of the model outside both (LLaVA's multi_modal_projector, Idefics3's
    connector), else the tower's own merger (Qwen2-VL's visual.merger)."""
    language = vision_language_parts(backbone)[1]
    outside = [m for m in backbone.children() if m is not vision and m is not language
               and any(True for _ in m.parameters())]
    if len(outside) == 1:
        return outside[0]
    merger = getattr(vision, "merger", None)
    return merger if not outside and isinstance(merger, nn.Module) else None


def fsdp_units(backbone):
    """Modules to shard one at a time before the root (FSDP2 `fully_shard`), in order.

    A vision-language model's vision tower is one unit (one all-gather for a small encoder);
    every other unit is a transformer block: a member of one of the model's own layer lists
    whose class is in its `_no_split_modules`. A block inside another (ConvNeXt's layers in
    its stages) goes with the outer one. A model without such lists (ResNet) has no units:
    it is sharded whole, as the root, and so is a module that is no Hugging Face model.
    """
    config = getattr(backbone, "config", None)
    vision = (vision_language_parts(backbone)[0]
              if config is not None and is_vision_language(config) else None)
    inside = set(vision.modules()) if vision is not None else set()
    blocks = set(getattr(backbone, "_no_split_modules", None) or ())
    units = [vision] if vision is not None else []
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and module not in inside:
            for block in module:
                if type(block).__name__ in blocks and block not in inside:
                    units.append(block)
                    inside.update(block.modules())
    return units


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
