"""Tiny random-init model folders of the transformers families the project supports, built from
configs and saved as a user's folder looks (weights, image processor; for vision-language models a
tokenizer trained here, the processor files and a chat template). Nothing is downloaded.

FAMILIES maps a family name to its builder; tests/test_families.py trains, evaluates and exports
each one, and docs/backbones.md lists them.
"""
import json
import os

import torch
import transformers

from conftest import VISION_TOKENS, save_tiny_vlm, train_tokenizer

SIZE = 32  # input pixels of the vision families (LeViT takes 64, MobileNetV2 16)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def vit_processor():
    return transformers.ViTImageProcessorPil(size={"height": SIZE, "width": SIZE})


def convnext_processor():
    return transformers.ConvNextImageProcessorPil(size={"shortest_edge": SIZE})


def clip_processor():
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                              crop_size={"height": SIZE, "width": SIZE})


def bit_processor():
    return transformers.BitImageProcessorPil(size={"shortest_edge": SIZE},
                                             crop_size={"height": SIZE, "width": SIZE})


def save(folder, model, *processors):
    torch.manual_seed(0)
    model().save_pretrained(folder)
    for processor in processors:
        processor.save_pretrained(folder)
    return str(folder)


def vision(model_class, config_class, processor, **config):
    """A builder of a vision family: AutoModel-style class, its config, the image processor."""
    def build(folder):
        return save(folder, lambda: model_class(config_class(**config)), processor())
    return build


def two_tower(model_class, config_class, processor, vision_config, text_config=None):
    """CLIP-style checkpoints (vision and text towers); the project loads the vision tower."""
    def build(folder):
        # token ids inside the tiny vocabulary (AIMv2's and MetaCLIP 2's defaults are not)
        text = text_config or dict(TOWER, vocab_size=100, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=1)
        return save(folder, lambda: model_class(config_class(vision_config=vision_config,
                                                             text_config=text)), processor())
    return build


T = transformers
VIT = dict(TOWER, image_size=SIZE, patch_size=8)
VISION_FAMILIES = {
    "vit": vision(T.ViTModel, T.ViTConfig, vit_processor, **VIT),
    "deit": vision(T.DeiTModel, T.DeiTConfig,
                   lambda: T.DeiTImageProcessorPil(size={"height": SIZE, "width": SIZE},
                                                   crop_size={"height": SIZE, "width": SIZE}),
                   **VIT),
    "beit": vision(T.BeitModel, T.BeitConfig,
                   lambda: T.BeitImageProcessorPil(size={"height": SIZE, "width": SIZE},
                                                   do_center_crop=False),
                   **VIT, use_mean_pooling=True),
    "dinov2": vision(T.Dinov2Model, T.Dinov2Config, bit_processor, **{
        k: v for k, v in VIT.items() if k != "intermediate_size"}, mlp_ratio=2),
    "dinov3": vision(T.DINOv3ViTModel, T.DINOv3ViTConfig, vit_processor, **VIT,
                     num_register_tokens=2),
    "convnext": vision(T.ConvNextModel, T.ConvNextConfig, convnext_processor,
                       hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    "convnextv2": vision(T.ConvNextV2Model, T.ConvNextV2Config, convnext_processor,
                         hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    "swin": vision(T.SwinModel, T.SwinConfig, vit_processor, image_size=SIZE, patch_size=4,
                   embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "swinv2": vision(T.Swinv2Model, T.Swinv2Config, vit_processor, image_size=SIZE, patch_size=4,
                     embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    "resnet": vision(T.ResNetModel, T.ResNetConfig, convnext_processor, embedding_size=16,
                     hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
    "regnet": vision(T.RegNetModel, T.RegNetConfig, convnext_processor, embedding_size=16,
                     hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
    "efficientnet": vision(
        T.EfficientNetModel, T.EfficientNetConfig,
        lambda: T.EfficientNetImageProcessorPil(size={"height": SIZE, "width": SIZE}),
        image_size=SIZE, width_coefficient=0.25, depth_coefficient=1.0, kernel_sizes=[3, 3],
        in_channels=[32, 16], out_channels=[16, 24], strides=[1, 2], num_block_repeats=[1, 1],
        expand_ratios=[1, 2], hidden_dim=320),
    "mobilenet_v2": vision(
        T.MobileNetV2Model, T.MobileNetV2Config,
        lambda: T.MobileNetV2ImageProcessorPil(size={"shortest_edge": 16},
                                               crop_size={"height": 16, "width": 16}),
        image_size=16, depth_multiplier=0.25, expand_ratio=2.0, finegrained_output=False),
    "mobilevit": vision(
        T.MobileViTModel, T.MobileViTConfig,
        lambda: T.MobileViTImageProcessorPil(size={"shortest_edge": SIZE},
                                             crop_size={"height": SIZE, "width": SIZE}),
        image_size=SIZE, hidden_sizes=[16, 16, 24], neck_hidden_sizes=[8, 8, 8, 16, 16, 24, 48],
        num_attention_heads=2, expand_ratio=2.0),
    "focalnet": vision(T.FocalNetModel, T.FocalNetConfig, bit_processor, image_size=SIZE,
                       embed_dim=16, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3],
                       hidden_sizes=[32, 64]),
    "levit": vision(
        T.LevitModel, T.LevitConfig,
        lambda: T.LevitImageProcessorPil(size={"shortest_edge": 64},
                                         crop_size={"height": 64, "width": 64}),
        image_size=64, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
        key_dim=[8, 8, 8]),
    "clip": two_tower(T.CLIPModel, T.CLIPConfig,
                      lambda: T.CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                                      crop_size={"height": SIZE, "width": SIZE}),
                      VIT),
    "siglip": two_tower(T.SiglipModel, T.SiglipConfig,
                        lambda: T.SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                        VIT),
    "siglip2": two_tower(T.Siglip2Model, T.Siglip2Config,
                         lambda: T.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16),
                         dict(TOWER, patch_size=8, num_patches=16)),
    # a two-tower folder whose vision tower class keeps its modules at the top level
    "aimv2": two_tower(T.Aimv2Model, T.Aimv2Config, clip_processor, VIT),
    # a vision tower config no auto class maps (MetaClip2VisionConfig)
    "metaclip_2": two_tower(T.MetaClip2Model, T.MetaClip2Config, clip_processor, VIT),
    # its checkpoints mask 75 % of the patches at random unless told otherwise
    "vit_mae": vision(T.ViTMAEModel, T.ViTMAEConfig, vit_processor, **VIT),
    "vit_msn": vision(T.ViTMSNModel, T.ViTMSNConfig, vit_processor, **VIT),
    # AutoModel gives HGNetV2Backbone: feature maps only
    "hgnet_v2": vision(
        T.HGNetV2Backbone, T.HGNetV2Config, convnext_processor, embedding_size=8, depths=[1, 1],
        hidden_sizes=[16, 32], stem_channels=[3, 8, 8], stage_in_channels=[8, 16],
        stage_mid_channels=[8, 8], stage_out_channels=[16, 32], stage_num_blocks=[1, 1],
        stage_downsample=[False, True], stage_downsample_strides=[2, 2],
        stage_light_block=[False, True], stage_kernel_size=[3, 3], stage_numb_of_layers=[2, 2],
        out_features=["stage2"]),
    # a backbone config only AutoBackbone maps (no AutoModel class)
    "rt_detr_resnet": vision(T.RTDetrResNetBackbone, T.RTDetrResNetConfig, convnext_processor,
                             embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                             layer_type="basic", out_features=["stage2"]),
    "textnet": vision(T.TextNetModel, T.TextNetConfig, convnext_processor, image_size=SIZE,
                      stem_out_channels=8, hidden_sizes=[8, 8, 16, 16, 32],
                      conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]], [[3, 3]], [[3, 3]]],
                      conv_layer_strides=[[1], [2], [2], [2]]),
    "swiftformer": vision(T.SwiftFormerModel, T.SwiftFormerConfig, vit_processor,
                          image_size=SIZE, depths=[1, 1, 1, 1], embed_dims=[8, 16, 16, 32],
                          mlp_ratio=2),
    "bit": vision(T.BitModel, T.BitConfig, bit_processor, embedding_size=16,
                  hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                  global_padding="SAME", num_groups=8),
    "poolformer": vision(T.PoolFormerModel, T.PoolFormerConfig, convnext_processor,
                         hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2,
                         patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], pool_size=3),
    "mobilenet_v1": vision(
        T.MobileNetV1Model, T.MobileNetV1Config,
        lambda: T.MobileNetV1ImageProcessorPil(size={"shortest_edge": SIZE},
                                               crop_size={"height": SIZE, "width": SIZE}),
        image_size=SIZE, depth_multiplier=0.25),
    "data2vec-vision": vision(
        T.Data2VecVisionModel, T.Data2VecVisionConfig,
        lambda: T.BeitImageProcessorPil(size={"height": SIZE, "width": SIZE},
                                        do_center_crop=False),
        **VIT, use_mean_pooling=True),
    "segformer": vision(
        T.SegformerModel, T.SegformerConfig,
        lambda: T.SegformerImageProcessorPil(size={"height": SIZE, "width": SIZE}),
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    # transformers indexes a stage's drop-path rates by the stage: each stage one block deeper
    "cvt": vision(T.CvtModel, T.CvtConfig, convnext_processor, embed_dim=[16, 32, 48],
                  num_heads=[1, 2, 2], depth=[1, 2, 3]),
    "mobilevitv2": vision(
        T.MobileViTV2Model, T.MobileViTV2Config,
        lambda: T.MobileViTImageProcessorPil(size={"shortest_edge": 64},
                                             crop_size={"height": 64, "width": 64}),
        image_size=64, width_multiplier=0.25),
    "vitdet": vision(T.VitDetModel, T.VitDetConfig, vit_processor, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=SIZE,
                     pretrain_image_size=SIZE, patch_size=8),
    "dinov2_with_registers": vision(
        T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig, bit_processor,
        **{k: v for k, v in VIT.items() if k != "intermediate_size"}, mlp_ratio=2,
        num_register_tokens=2),
    "ijepa": vision(T.IJepaModel, T.IJepaConfig, vit_processor, **VIT),
    # its config keeps the pre-training mask_ratio, which HieraModel never applies
    "hiera": vision(T.HieraModel, T.HieraConfig, bit_processor, embed_dim=8,
                    image_size=[SIZE, SIZE], depths=[1, 1], num_heads=[1, 2], num_query_pool=1,
                    masked_unit_size=[4, 4], masked_unit_attention=[True, False]),
    "pvt": vision(T.PvtModel, T.PvtConfig,
                  lambda: T.PvtImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                  image_size=SIZE, num_encoder_blocks=2, depths=[1, 1],
                  sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[4, 2],
                  strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "pvt_v2": vision(T.PvtV2Model, T.PvtV2Config,
                     lambda: T.PvtImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                     image_size=SIZE, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                     hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                     num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    # a BERT text tower beside a CLIP-style vision tower
    "chinese_clip": two_tower(
        T.ChineseCLIPModel, T.ChineseCLIPConfig,
        lambda: T.ChineseCLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                               crop_size={"height": SIZE, "width": SIZE}),
        VIT, dict(TOWER, vocab_size=100, pad_token_id=0)),
}


# ----------------------------------------------------------------------------- vision-language

def chat_template(image, user, end, opening, start=""):
    """A chat template of one family's format: `start`, each turn as `user` (with {role}), its parts
    (an image as `image`), `end`; then the assistant turn opened with `opening`."""
    head, tail = user.split("{role}")
    return (f"{start}{{% for message in messages %}}{head}{{{{ message['role'] }}}}{tail}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}" + end +
            "{% endfor %}{% if add_generation_prompt %}" + opening + "{% endif %}")


CHATML = dict(user="<|im_start|>{role}\n", end="<|im_end|>\n", opening="<|im_start|>assistant\n")
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def text_config(tokenizer, **extra):
    return dict(LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **extra)


def write_json(folder, name, content):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(content, f, indent=2)


def save_vlm(folder, model, tokenizer, image_processor, processor=None, processor_config=None,
             video_processor=None):
    """The model, tokenizer and image processor; the processor (where it builds without
    torchvision), or its processor_config.json and video_preprocessor_config.json as the Hub has
    them (a processor whose video processor needs torchvision)."""
    torch.manual_seed(0)
    model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    if processor is not None:
        processor(image_processor, tokenizer).save_pretrained(folder)
    if processor_config is not None:
        write_json(folder, "processor_config.json", processor_config)
        if tokenizer.chat_template:
            with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
                f.write(tokenizer.chat_template)
    if video_processor is not None:
        write_json(folder, "video_preprocessor_config.json", video_processor)
    return str(folder)


def qwen_vl(kind):
    return lambda folder: save_tiny_vlm(folder, kind)


def qwen3_vl(folder, moe=False):
    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    experts = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                   decoder_sparse_step=1) if moe else {}
    config = (T.Qwen3VLMoeConfig if moe else T.Qwen3VLConfig)(
        text_config=text_config(tokenizer, head_dim=16, rope_parameters={
            "rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
            "mrope_interleaved": True}, **experts),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=16, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    image_processor = T.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                 min_pixels=64 * 64, max_pixels=128 * 128)
    model = T.Qwen3VLMoeForConditionalGeneration if moe else T.Qwen3VLForConditionalGeneration
    return save_vlm(folder, lambda: model(config), tokenizer,
                    image_processor, processor_config={"processor_class": "Qwen3VLProcessor"},
                    video_processor={"video_processor_type": "Qwen3VLVideoProcessor",
                                     "patch_size": 16, "merge_size": 2})


def llava(folder, config_class=T.LlavaConfig, model_class=T.LlavaForConditionalGeneration,
          feature_layer=-1):
    tokenizer = train_tokenizer(VISION_TOKENS + ["<image>"], chat_template=None)
    config = config_class(
        vision_config=T.CLIPVisionConfig(**TOWER, image_size=28, patch_size=14),
        text_config=T.LlamaConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer)
    image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                              crop_size={"height": 28, "width": 28})
    return save_vlm(folder, lambda: model_class(config), tokenizer,
                    image_processor, processor=lambda i, t: T.LlavaProcessor(
                        image_processor=i, tokenizer=t, patch_size=14, image_token="<image>",
                        vision_feature_select_strategy="default", num_additional_image_tokens=1))


def vipllava(folder):
    """VipLLaVA: LLaVA whose projector reads several layers of the CLIP tower at once (here the
    last two, concatenated), with LLaVA's processor."""
    return llava(folder, T.VipLlavaConfig, T.VipLlavaForConditionalGeneration, [-2, -1])


def llava_next(folder):
    tokenizer = train_tokenizer(VISION_TOKENS + ["<image>"], chat_template=None)
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**TOWER, image_size=28, patch_size=14),
        text_config=T.LlamaConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints)
    image_processor = T.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=pinpoints)
    return save_vlm(folder, lambda: T.LlavaNextForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.LlavaNextProcessor(
                        image_processor=i, tokenizer=t, patch_size=14, image_token="<image>",
                        vision_feature_select_strategy="default", num_additional_image_tokens=1))


def llava_onevision(folder):
    tokenizer = train_tokenizer(CHATML_TOKENS + ["<image>", "<video>"],
                                chat_template(image="<image>", **CHATML))
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = T.LlavaOnevisionConfig(
        vision_config=T.SiglipVisionConfig(**TOWER, image_size=28, patch_size=14),
        text_config=T.Qwen2Config(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
    image_processor = T.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                        image_grid_pinpoints=pinpoints)
    return save_vlm(folder, lambda: T.LlavaOnevisionForConditionalGeneration(config), tokenizer,
                    image_processor, processor_config={
                        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 4,
                        "vision_feature_select_strategy": "full",
                        "vision_aspect_ratio": "anyres_max_9"},
                    video_processor={"video_processor_type": "LlavaOnevisionVideoProcessor",
                                     "size": {"height": 28, "width": 28}})


def internvl(folder):
    named = {"start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tokenizer = train_tokenizer(CHATML_TOKENS + list(named.values()),
                                chat_template(image="<IMG_CONTEXT>\n", **CHATML),
                                extra_special_tokens=named)
    config = T.InternVLConfig(
        vision_config=T.InternVLVisionConfig(**TOWER, image_size=[32, 32], patch_size=[8, 8]),
        text_config=T.Qwen2Config(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
        vision_feature_layer=-1)
    image_processor = T.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32},
                                                 max_patches=2)
    return save_vlm(folder, lambda: T.InternVLForConditionalGeneration(config), tokenizer,
                    image_processor, processor_config={"processor_class": "InternVLProcessor",
                                                       "image_seq_length": 4},
                    video_processor={"video_processor_type": "InternVLVideoProcessor",
                                     "size": {"height": 32, "width": 32}})


IDEFICS_TOKENS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>",
                  "<fake_token_around_image>", "<image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IDEFICS_TEMPLATE = chat_template(image="<image>", user="<|im_start|>{role}:",
                                 end="<end_of_utterance>\n", opening="Assistant:")


def idefics3(folder, smolvlm=False):
    tokenizer = train_tokenizer(IDEFICS_TOKENS, IDEFICS_TEMPLATE, eos_token="<end_of_utterance>")
    family = "SmolVLM" if smolvlm else "Idefics3"
    vision_config = getattr(T, f"{family}VisionConfig")(**TOWER, image_size=32, patch_size=8)
    config = getattr(T, f"{family}Config")(
        vision_config=vision_config, text_config=T.LlamaConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    image_processor = getattr(T, f"{family}ImageProcessorPil")(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    model = getattr(T, f"{family}ForConditionalGeneration")
    if not smolvlm:
        return save_vlm(folder, lambda: model(config), tokenizer, image_processor,
                        processor=lambda i, t: T.Idefics3Processor(i, t, image_seq_len=4,
                                                                   chat_template=IDEFICS_TEMPLATE))
    return save_vlm(folder, lambda: model(config), tokenizer, image_processor,
                    processor_config={"processor_class": "SmolVLMProcessor", "image_seq_len": 4},
                    video_processor={"video_processor_type": "SmolVLMVideoProcessor"})


GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<image>"]


def idefics2(folder):
    """Idefics2: a SigLIP-like tower whose patches a perceiver resampler turns into 4 latents,
    each an <image> token of a Mistral model, between <fake_token_around_image> tokens; split
    into 4 crops and the whole image, as its Hub folders are."""
    template = chat_template(image="<image>", user="{role}:", end="<end_of_utterance>\n",
                             opening="Assistant:")
    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>",
                                 "<end_of_utterance>"], template, eos_token="</s>",
                                pad_token="<unk>", bos_token="<s>")
    config = T.Idefics2Config(
        vision_config=T.Idefics2VisionConfig(**TOWER, image_size=32, patch_size=8),
        perceiver_config=T.Idefics2PerceiverConfig(
            hidden_size=LLAMA["hidden_size"], resampler_n_latents=4, resampler_depth=1,
            resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1),
        text_config=T.MistralConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = T.Idefics2ImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32},
                                                  do_image_splitting=True)
    return save_vlm(folder, lambda: T.Idefics2ForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.Idefics2Processor(
                        i, t, image_seq_len=4, chat_template=template))


def got_ocr2(folder):
    """GOT-OCR2: a SAM-style windowed tower whose 64 x 64 patch grid two strided convolutions
    take to the 256 <imgpad> tokens (a number its processor fixes) of a Qwen2 model; the chat
    template writes <img><imgpad></img> as its processor's own prompt does."""
    tokenizer = train_tokenizer(CHATML_TOKENS + ["<img>", "</img>", "<imgpad>"],
                                chat_template(image="<img><imgpad></img>\n", **CHATML))
    config = T.GotOcr2Config(
        vision_config=T.GotOcr2VisionConfig(
            hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=1,
            image_size=64, patch_size=1, window_size=8, global_attn_indexes=[],
            output_channels=8),
        text_config=T.Qwen2Config(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<imgpad>"))
    image_processor = T.GotOcr2ImageProcessorPil(size={"height": 64, "width": 64})
    return save_vlm(folder, lambda: T.GotOcr2ForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.GotOcr2Processor(
                        i, t, chat_template=tokenizer.chat_template))


def gemma3(folder):
    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
             "eoi_token": "<end_of_image>"}
    template = chat_template(image="<start_of_image>", user="<start_of_turn>{role}\n",
                             end="<end_of_turn>\n", opening="<start_of_turn>model\n",
                             start="<bos>")
    tokenizer = train_tokenizer(GEMMA_TOKENS, template, eos_token="<eos>", pad_token="<pad>",
                                bos_token="<bos>", extra_special_tokens=named)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in named.items()}
    config = T.Gemma3Config(
        text_config=T.Gemma3TextConfig(**text_config(tokenizer, head_dim=16), sliding_window=16),
        vision_config=T.SiglipVisionConfig(**TOWER, image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"])
    image_processor = T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return save_vlm(folder, lambda: T.Gemma3ForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.Gemma3Processor(
                        i, t, image_seq_length=4, chat_template=template))


def paligemma(folder):
    tokenizer = train_tokenizer(GEMMA_TOKENS, None, eos_token="<eos>", pad_token="<pad>",
                                bos_token="<bos>", extra_special_tokens={"image_token": "<image>"})
    config = T.PaliGemmaConfig(
        vision_config=T.SiglipVisionConfig(**TOWER, image_size=32, patch_size=8,
                                           projection_dim=64),
        text_config=T.GemmaConfig(**text_config(tokenizer, head_dim=16)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=64)
    image_processor = T.SiglipImageProcessorPil(size={"height": 32, "width": 32},
                                                image_seq_length=16)
    return save_vlm(folder, lambda: T.PaliGemmaForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.PaliGemmaProcessor(i, t))


def mllama(folder):
    template = chat_template(
        image="<|image|>", user="<|start_header_id|>{role}<|end_header_id|>\n\n", end="<|eot_id|>",
        opening="<|start_header_id|>assistant<|end_header_id|>\n\n", start="<|begin_of_text|>")
    tokenizer = train_tokenizer(
        ["<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
         "<|end_header_id|>", "<|image|>", "<|python_tag|>"], template, eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>")
    config = T.MllamaConfig(
        vision_config=T.MllamaVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
            attention_heads=2, image_size=28, patch_size=14, max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers_indices=[0],
            vision_output_dim=64),
        text_config=T.MllamaTextConfig(**text_config(tokenizer), cross_attention_layers=[1],
                                       bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"))
    image_processor = T.MllamaImageProcessorPil(size={"height": 28, "width": 28},
                                                max_image_tiles=2)
    return save_vlm(folder, lambda: T.MllamaForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.MllamaProcessor(
                        i, t, chat_template=template))


def blip2(folder, instruct=False):
    """BLIP-2 / InstructBLIP as the Hub has them (the whole *ForConditionalGeneration, its
    processor); the project classifies over their vision tower."""
    tokenizer = train_tokenizer(["<|endoftext|>", "<image>"], None, eos_token="<|endoftext|>")
    family = "InstructBlip" if instruct else "Blip2"
    qformer = dict(TOWER, vocab_size=len(tokenizer), encoder_hidden_size=TOWER["hidden_size"])
    text = T.LlamaConfig(**text_config(tokenizer)) if instruct else T.OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, word_embed_proj_dim=64, pad_token_id=tokenizer.pad_token_id)
    config = getattr(T, f"{family}Config")(
        vision_config=dict(TOWER, image_size=SIZE, patch_size=8), qformer_config=qformer,
        text_config=text, num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = T.BlipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    extra = {"qformer_tokenizer": tokenizer} if instruct else {}
    return save_vlm(folder, lambda: getattr(T, f"{family}ForConditionalGeneration")(config),
                    tokenizer, image_processor, processor=lambda i, t: getattr(
                        T, f"{family}Processor")(image_processor=i, tokenizer=t,
                                                 num_query_tokens=4, **extra))


AYA_TOKENS = ["<|END_OF_TURN_TOKEN|>", "<PAD>", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>",
              "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<image>", "<|START_OF_IMG|>",
              "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]


def aya_vision(folder):
    """Aya Vision: a SigLIP tower, pixel-shuffled (downsample_factor 2) into a Cohere2 model;
    the processor expands <image> into <|IMG_PATCH|> tokens, 4 per 32-pixel tile."""
    template = chat_template(image="<image>", user="<|START_OF_TURN_TOKEN|>{role}",
                             end="<|END_OF_TURN_TOKEN|>",
                             opening="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                             start="<BOS_TOKEN>")
    tokenizer = train_tokenizer(AYA_TOKENS, template, eos_token="<|END_OF_TURN_TOKEN|>",
                                pad_token="<PAD>", bos_token="<BOS_TOKEN>")
    config = T.AyaVisionConfig(
        vision_config=T.SiglipVisionConfig(**TOWER, image_size=32, patch_size=8,
                                           vision_use_head=False),
        text_config=T.Cohere2Config(**text_config(tokenizer), sliding_window=16,
                                    bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2)
    image_processor = T.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32},
                                                 max_patches=2)
    return save_vlm(folder, lambda: T.AyaVisionForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.AyaVisionProcessor(
                        i, t, patch_size=8, img_size=32, downsample_factor=2,
                        chat_template=template))


def deepseek_vl(folder):
    """DeepSeek-VL: a SigLIP tower whose every patch, through the aligner, is one
    <image_placeholder> token of a Llama model (16 for a 32-pixel image)."""
    template = chat_template(image="<image_placeholder>", user="{role}: ", end="\n\n",
                             opening="Assistant:")
    tokenizer = train_tokenizer(["<|end_of_sentence|>", "<|begin_of_sentence|>", "<pad>",
                                 "<image_placeholder>"], template,
                                eos_token="<|end_of_sentence|>", pad_token="<pad>",
                                bos_token="<|begin_of_sentence|>",
                                extra_special_tokens={"image_token": "<image_placeholder>"})
    config = T.DeepseekVLConfig(
        vision_config=T.SiglipVisionConfig(**TOWER, image_size=32, patch_size=8),
        text_config=T.LlamaConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    image_processor = T.DeepseekVLImageProcessorPil(size={"height": 32, "width": 32},
                                                    min_size=8)
    return save_vlm(folder, lambda: T.DeepseekVLForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.DeepseekVLProcessor(
                        i, t, chat_template=template, num_image_tokens=16))


def janus(folder):
    """Janus: a SigLIP-like tower through its aligner into Llama, <image_placeholder> tokens
    between <begin_of_image> and <end_of_image>; the folder also holds the VQ-VAE and heads of
    image generation, which classification never runs (GroupNorm needs 32-channel multiples)."""
    named = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
             "eoi_token": "<end_of_image>"}
    template = chat_template(image="<image_placeholder>", user="{role}: ", end="\n\n",
                             opening="Assistant:", start="<|begin_of_sentence|>")
    tokenizer = train_tokenizer(["<|end_of_sentence|>", "<|begin_of_sentence|>", "<pad>",
                                 *named.values()], template, eos_token="<|end_of_sentence|>",
                                pad_token="<pad>", bos_token="<|begin_of_sentence|>",
                                extra_special_tokens=named)
    config = T.JanusConfig(
        vision_config=T.JanusVisionConfig(hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, mlp_ratio=2.0, image_size=32,
                                          patch_size=8, projection_dim=64, num_image_tokens=16),
        vq_config=T.JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=32,
                                     base_channels=32, channel_multiplier=[1, 1],
                                     num_res_blocks=1, projection_dim=64,
                                     image_token_embed_dim=64),
        text_config=T.LlamaConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    image_processor = T.JanusImageProcessorPil(size={"height": 32, "width": 32}, min_size=8)
    return save_vlm(folder, lambda: T.JanusForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.JanusProcessor(
                        i, t, chat_template=template, num_image_tokens=16))


OVIS_INDICATORS = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def ovis2(folder):
    """Ovis2: its tower's probabilities over a visual vocabulary (64 words here) embed each
    <IMG_ATOM> (4 per 32-pixel tile, hidden_stride 2) of a Qwen2 model; <image> in the prompt is
    expanded into the tiles' atoms and indicator tokens."""
    tokenizer = train_tokenizer(CHATML_TOKENS + ["<image>", "<IMG_ATOM>", *OVIS_INDICATORS],
                                chat_template(image="<image>\n", **CHATML))
    config = T.Ovis2Config(
        vision_config=T.Ovis2VisionConfig(**TOWER, image_size=32, patch_size=8, hidden_stride=2,
                                          vocab_size=64),
        text_config=T.Qwen2Config(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_ATOM>"),
        visual_indicator_token_ids=tokenizer.convert_tokens_to_ids(OVIS_INDICATORS),
        vocab_size=len(tokenizer), hidden_size=LLAMA["hidden_size"])
    image_processor = T.Ovis2ImageProcessorPil(size={"height": 32, "width": 32},
                                               crop_to_patches=True, max_patches=2)
    return save_vlm(folder, lambda: T.Ovis2ForConditionalGeneration(config), tokenizer,
                    image_processor, processor=lambda i, t: T.Ovis2Processor(
                        i, t, chat_template=tokenizer.chat_template, image_seq_length=4))


GLM_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|image|>",
              "<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>",
              "<|end_of_video|>"]


def glm4v(folder):
    """GLM-4.1V: a Qwen2-VL-like tower (patches merged 2 x 2) into a GLM-4 model with 3-D rotary
    positions; <|image|> between <|begin_of_image|> and <|end_of_image|>. Its video processor
    needs torchvision: the folder has its files as the Hub has them."""
    template = chat_template(image="<|begin_of_image|><|image|><|end_of_image|>",
                             user="<|{role}|>\n", end="", opening="<|assistant|>\n",
                             start="[gMASK]<sop>")
    tokenizer = train_tokenizer(GLM_TOKENS, template, eos_token="<|user|>",
                                pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GLM_TOKENS}
    config = T.Glm4vConfig(
        text_config=text_config(tokenizer, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1]}),
        vision_config=T.Glm4vVisionConfig(depth=2, hidden_size=32, intermediate_size=64,
                                          num_heads=2, out_hidden_size=64, patch_size=8,
                                          image_size=32),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"])
    image_processor = T.Glm4vImageProcessorPil(
        patch_size=8, merge_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64})
    return save_vlm(folder, lambda: T.Glm4vForConditionalGeneration(config), tokenizer,
                    image_processor, processor_config={"processor_class": "Glm4vProcessor"},
                    video_processor={"video_processor_type": "Glm4vVideoProcessor",
                                     "patch_size": 8, "merge_size": 2})


VLM_FAMILIES = {
    "qwen2_vl": qwen_vl("qwen2_vl"),
    "qwen2_5_vl": qwen_vl("qwen2_5_vl"),
    "qwen3_vl": qwen3_vl,
    "qwen3_vl_moe": lambda folder: qwen3_vl(folder, moe=True),
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "internvl": internvl,
    "idefics3": idefics3,
    "smolvlm": lambda folder: idefics3(folder, smolvlm=True),
    "gemma3": gemma3,
    "paligemma": paligemma,
    "mllama": mllama,
    "aya_vision": aya_vision,
    "deepseek_vl": deepseek_vl,
    "janus": janus,
    "ovis2": ovis2,
    "glm4v": glm4v,
    "idefics2": idefics2,
    "got_ocr2": got_ocr2,
    "vipllava": vipllava,
}
# image-text-to-text folders classified over their vision tower
TOWER_FAMILIES = {
    "blip-2": blip2,
    "instructblip": lambda folder: blip2(folder, instruct=True),
}
FAMILIES = {**VISION_FAMILIES, **TOWER_FAMILIES, **VLM_FAMILIES}
