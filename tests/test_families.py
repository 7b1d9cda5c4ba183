"""The family matrix: a tiny folder of every transformers family the project supports (built here,
tests/families.py) trains 3 steps, resumes exactly, is evaluated by eval.py twice with identical
predictions and, for vision backbones, is exported and run by transformers' pipeline.
docs/backbones.md's table is checked against what these tests measure."""
import os
import re
import shutil

import pytest
import torch
import transformers
from PIL import Image

import eval as eval_script
import train
from backbone import fsdp_units, is_vision_language, load_backbone, vision_language_parts
from conftest import ROOT, killed_after, load_weights, read_jsonl, run_script, train_args
from export import ExportError, export
from families import FAMILIES, VLM_FAMILIES
from model import POOLINGS, MaskedClassifier, load_classifier

# family: the --pooling it trains with here, and what export.py makes of the checkpoint (the
# image-classification class, or why it refuses)
RUNS = {
    "vit": ("cls", "ViTForImageClassification"),
    "deit": ("cls", "DeiTForImageClassification"),
    "beit": ("auto", "BeitForImageClassification"),
    "dinov2": ("auto", "Dinov2ForImageClassification"),
    "dinov3": ("auto", "refused: transformers has no image-classification class"),
    "convnext": ("auto", "ConvNextForImageClassification"),
    "convnextv2": ("auto", "ConvNextV2ForImageClassification"),
    "swin": ("auto", "SwinForImageClassification"),
    "swinv2": ("auto", "Swinv2ForImageClassification"),
    "resnet": ("auto", "ResNetForImageClassification"),
    "regnet": ("auto", "RegNetForImageClassification"),
    "efficientnet": ("auto", "EfficientNetForImageClassification"),
    "mobilenet_v2": ("auto", "MobileNetV2ForImageClassification"),
    "mobilevit": ("auto", "MobileViTForImageClassification"),
    "focalnet": ("auto", "FocalNetForImageClassification"),
    "levit": ("auto", "LevitForImageClassification"),
    "clip": ("mean", "refused: its class pools the patch tokens before post_layernorm"),
    "siglip": ("mean", "SiglipForImageClassification"),
    "siglip2": ("mean", "Siglip2ForImageClassification"),
    "aimv2": ("auto", "refused: transformers has no image-classification class"),
    "metaclip_2": ("mean", "refused: its class pools the patch tokens before post_layernorm"),
    "vit_mae": ("auto", "refused: transformers has no image-classification class"),
    "vit_msn": ("cls", "ViTMSNForImageClassification"),
    "hgnet_v2": ("auto", "HGNetV2ForImageClassification"),
    "rt_detr_resnet": ("auto", "refused: transformers has no image-classification class"),
    "textnet": ("mean", "TextNetForImageClassification"),
    "swiftformer": ("auto", "SwiftFormerForImageClassification"),
    "bit": ("auto", "BitForImageClassification"),
    "poolformer": ("auto", "refused: its class normalises the features before its classifier"),
    "mobilenet_v1": ("auto", "MobileNetV1ForImageClassification"),
    "data2vec-vision": ("auto", "refused: its class has a pooler the backbone lacks"),
    "segformer": ("mean", "SegformerForImageClassification"),
    "cvt": ("auto", "refused: its class normalises the features before its classifier"),
    "mobilevitv2": ("auto", "MobileViTV2ForImageClassification"),
    "vitdet": ("mean", "refused: transformers has no image-classification class"),
    "dinov2_with_registers": ("auto", "Dinov2WithRegistersForImageClassification"),
    "ijepa": ("auto", "IJepaForImageClassification"),
    "hiera": ("auto", "HieraForImageClassification"),
    "pvt": ("cls", "PvtForImageClassification"),
    "pvt_v2": ("auto", "PvtV2ForImageClassification"),
    "chinese_clip": ("auto", "refused: transformers has no image-classification class"),
    "blip-2": ("auto", "refused: transformers has no image-classification class"),
    "instructblip": ("auto", "refused: transformers has no image-classification class"),
    **{name: ("last", "refused: a vision-language checkpoint") for name in VLM_FAMILIES},
}
REFUSALS = {  # the words of export.py's refusal each "refused:" cell stands for
    "refused: transformers has no image-classification class":
        "transformers has no image-classification class",
    "refused: its class pools the patch tokens before post_layernorm":
        "mean of the patch tokens before post_layernorm",
    "refused: a vision-language checkpoint": "is a vision-language checkpoint",
    "refused: its class normalises the features before its classifier":
        "has weights outside the backbone and its classifier that the checkpoint cannot fill",
    "refused: its class has a pooler the backbone lacks":
        "needs parts the backbone was built without or in another shape: pooler",
}
TABLE = os.path.join(ROOT, "docs", "backbones.md")
COLUMNS = ("family", "class", "kind", "FSDP units", "--pooling", "export")


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """family name -> its folder, built on first use once per session (per xdist worker)."""
    built = {}

    def folder(name):
        if name not in built:
            built[name] = FAMILIES[name](tmp_path_factory.mktemp(name))
        return built[name]
    return folder


def test_the_matrix_covers_every_family_and_the_table_lists_them():
    assert set(RUNS) == set(FAMILIES) and len(FAMILIES) >= 25
    assert list(documented_rows()) == list(FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_resumes_evaluates_and_exports(name, family_folder, small_data, tmp_path):
    folder = family_folder(name)
    pooling, exported = RUNS[name]
    common = ["--max_steps", 3, "--save_steps", 2, "--skip_evaluation", "--pooling", pooling]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main(train_args(small_data, folder, full, *common))
    killed_after(full / "checkpoint-2", resumed)
    train.main(train_args(small_data, folder, resumed, *common, "--resume", "latest"))
    checkpoint = full / "checkpoint-3"
    a, b = load_weights(checkpoint), load_weights(resumed / "checkpoint-3")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"
    before = load_weights(full / "checkpoint-2")
    assert not torch.equal(a["head.weight"], before["head.weight"])  # step 3 trained

    predictions = []
    for i in range(2):  # two evaluations of one checkpoint: a random forward (ViTMAE's masking)
        path = tmp_path / f"predictions-{i}.jsonl"
        eval_script.main([str(checkpoint), "--num_workers", "0", "--predictions", str(path)])
        predictions.append(read_jsonl(path))
    assert len(predictions[0]) == 31 and predictions[0] == predictions[1]  # one machine, one run
    row = read_jsonl(full / "eval_results.jsonl")[0]
    assert (row["eval_digits_samples"], row["eval_faces_samples"]) == (21, 10)
    assert 0 <= row["eval_overall_accuracy"] <= 1 and row["eval_overall_loss"] > 0

    check_export(checkpoint, tmp_path / "exported", exported, small_data)
    cell = exported if exported.startswith("refused: ") else f"{exported} (--pooling {pooling})"
    measured, documented = table_row(name, folder, cell), documented_rows()[name]
    if transformers.__version__ != pinned_version("transformers"):  # units follow the release
        del measured[3], documented[3]
    assert measured == documented


def check_export(checkpoint, out, exported, small_data):
    """export.py's digits classifier, run by transformers' pipeline on real images: its scores
    are the checkpoint's masked probabilities. A refusal is checked for its reason."""
    if exported.startswith("refused: "):
        with pytest.raises(ExportError, match=REFUSALS[exported]):
            export(str(checkpoint), "digits", str(out))
        return
    from transformers import pipeline
    target = export(str(checkpoint), "digits", str(out))
    assert type(target).__name__ == exported
    model, inputs, _ = load_classifier(str(checkpoint))
    paths = [r["image_path"] for r in read_jsonl(small_data["digits_val"])[:2]]
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        probabilities = model.eval()(**inputs(images, ["digits"] * 2))[:, :10].softmax(-1)
    results = pipeline("image-classification", model=str(out))(paths, top_k=10)
    for result, expected in zip(results, probabilities, strict=True):
        by_label = {r["label"]: r["score"] for r in result}  # each score under its class name
        scores = torch.tensor([by_label[target.config.id2label[i]] for i in range(10)])
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def table_row(name, folder, exported):
    """The family's row of docs/backbones.md, from the model: its class, FSDP units, the
    --pooling choices it takes (a refusal names the class) and export's result."""
    backbone, inputs = load_backbone(folder)
    model_class = type(backbone).__name__
    takes = []
    for pooling in POOLINGS:
        try:
            MaskedClassifier(backbone, 2, pooling, inputs=inputs)
            takes.append(pooling)
        except ValueError as e:
            assert model_class in str(e), e
    kind = "vision-language" if is_vision_language(backbone.config) else "vision"
    return [name, model_class, kind, describe_units(backbone), ", ".join(takes), exported]


def describe_units(backbone):
    units = fsdp_units(backbone)
    vision = (vision_language_parts(backbone)[0] if is_vision_language(backbone.config)
              else None)
    kinds = list(dict.fromkeys(type(u).__name__ for u in units if u is not vision))
    parts = (["vision tower"] if vision is not None else []) + [f"each {k}" for k in kinds]
    return ", ".join(parts) or "none: sharded whole"


def pinned_version(package):
    """The version constraints.txt pins, which docs/backbones.md's table is of."""
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        return next(line.split("==")[1].strip() for line in f if line.startswith(f"{package}=="))


def documented_rows():
    """{family: cells} of the table in docs/backbones.md."""
    with open(TABLE) as f:
        lines = [line.strip() for line in f]
    header = "| " + " | ".join(COLUMNS) + " |"
    start = lines.index(header) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"`", "", c.strip()) for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("name", ["resnet", "convnext", "swin", "siglip"])
def test_pooling_cls_without_a_class_token_is_refused_naming_the_model(name, family_folder,
                                                                        small_data, tmp_path,
                                                                        capsys):
    with pytest.raises(SystemExit) as e:
        train.main(train_args(small_data, family_folder(name), tmp_path, "--max_steps", 1,
                              "--pooling", "cls"))
    error = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(error) == 1
    model_class = documented_rows()[name][1]
    assert error[0].startswith(f"error: --pooling cls: {model_class} has no CLS token")


def test_an_image_text_model_without_a_vision_tower_is_refused_when_it_loads(tmp_path,
                                                                             small_data, capsys):
    """Fuyu feeds image patches straight into its language model: nothing to freeze, shard or
    give its own learning rate as a vision tower."""
    import transformers
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2)
    transformers.FuyuForCausalLM(transformers.FuyuConfig(
        text_config=text, image_size=30, patch_size=15, image_token_id=63)).save_pretrained(
            tmp_path / "fuyu")
    with pytest.raises(ValueError, match="FuyuModel: cannot find its vision tower"):
        load_backbone(str(tmp_path / "fuyu"))
    with pytest.raises(SystemExit) as e:
        train.main(train_args(small_data, tmp_path / "fuyu", tmp_path / "out", "--max_steps", 1))
    assert e.value.code == 2 and "FuyuModel: cannot find" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_an_image_processor_that_needs_torchvision_says_so(family_folder, tmp_path):
    """Hub DINOv3 folders name DINOv3ViTImageProcessor, which runs on torchvision only."""
    import json
    folder = tmp_path / "dinov3"
    shutil.copytree(family_folder("dinov3"), folder)
    with open(folder / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "DINOv3ViTImageProcessor",
                   "size": {"height": 32, "width": 32}}, f)
    with pytest.raises(ValueError, match=r"DINOv3ViTImageProcessor.*pip install torchvision"):
        load_backbone(str(folder))


@pytest.mark.parametrize("name, dist", [("siglip2", "fsdp"), ("smolvlm", "fsdp"),
                                        ("llava", "fsdp"), ("llava_onevision", "ddp")])
def test_two_processes_train_a_new_family(name, dist, family_folder, small_data, tmp_path):
    """FSDP2 over 2 gloo processes, each rank reading only its shards of the folder's weights:
    SigLIP2 (its processor's mask and shapes), SmolVLM (text_model, the processor without its
    video processor) and LLaVA (its projector reads the sharded tower's recorded hidden states;
    its CLIP embeddings compute position ids beside a weight read after sharding). DDP:
    LLaVA-OneVision's vision tower holds a pooling head its language model never reads, which
    DDP must be told to look for."""
    out = tmp_path / "run"
    result = run_script("train.py", *train_args(
        small_data, family_folder(name), out, "--max_steps", 3, "--save_steps", 3,
        "--skip_evaluation", "--dist", dist, "--dist_timeout_minutes", 2), torchrun=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    if dist == "fsdp":
        assert "FSDP2 over 2 processes" in result.stdout
        assert "each process reads only its shards" in result.stdout
    start = load_backbone(family_folder(name))[0]
    trained = load_backbone(str(out / "checkpoint-3"))[0].state_dict()
    names = {id(p): n for n, p in start.named_parameters()}
    last_block = [names[id(p)] for p in fsdp_units(start)[-1].parameters()]
    assert last_block and all(not torch.equal(trained[k], start.state_dict()[k])
                              for k in last_block)  # gradients reached the deepest block


def test_export_names_a_part_the_backbone_was_built_without():
    """BeitForImageClassification classifies BEiT's pooler output; a BeitModel built without its
    pooler cannot fill it."""
    import transformers
    from export import copy_backbone
    config = transformers.BeitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=8,
                                     use_mean_pooling=True)
    target = transformers.BeitForImageClassification(config)
    with pytest.raises(ExportError, match="BeitForImageClassification needs parts the backbone "
                       "was built without or in another shape: pooler"):
        copy_backbone(transformers.BeitModel(config, add_pooling_layer=False), target)
    copy_backbone(transformers.BeitModel(config), target)


def without_keys(folder, out, dropped):
    """A copy of a model folder whose weights file lacks the keys for which dropped(key) holds."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(folder, out)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not dropped(k)},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_a_folder_without_some_backbone_weights_is_refused_naming_them(family_folder,
                                                                       small_data, tmp_path,
                                                                       capsys):
    """A ViT folder without its pooler (as ViTForImageClassification saves it, the layout of most
    fine-tuned ViT folders on the Hub): transformers would initialise the pooler at random and
    `--pooling auto` would train on it, unless --random_init names it."""
    from backbone import MissingWeights
    folder = without_keys(family_folder("vit"), tmp_path / "vit", lambda k: "pooler" in k)
    with pytest.raises(MissingWeights, match=r"2 weight\(s\) of ViTModel are not in the folder: "
                       r"\['pooler.dense.bias', 'pooler.dense.weight'\]"):
        load_backbone(folder)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(small_data, folder, tmp_path / "out", "--max_steps", 1))
    assert e.value.code == 2 and "would start from random values" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    # asked for by name, it is announced; a named part the folder holds whole is an error
    with pytest.raises(ValueError, match=r"--random_init encoder: .* lacks no weight of "
                       r"ViTModel there \(it lacks \['pooler.dense.bias'"):
        load_backbone(folder, random_init=("pooler", "encoder"))
    with pytest.raises(MissingWeights, match=r"\['pooler.dense.weight'\]"):
        load_backbone(folder, random_init=("pooler.dense.bias",))
    train.main(train_args(small_data, folder, tmp_path / "asked", "--max_steps", 1,
                          "--skip_evaluation", "--random_init", "pooler"))
    assert ("2 weight(s) of ViTModel start from random values, as --random_init asks: "
            "['pooler.dense.bias', 'pooler.dense.weight']") in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "asked" / "checkpoint-1")
    # kept frozen at random, the pooler would stand between every feature and the head
    for flags in (["--train_only_head"], ["--freeze", "vision"], ["--lora_rank", 2]):
        with pytest.raises(SystemExit):
            train.main(train_args(small_data, folder, tmp_path / "frozen", "--max_steps", 1,
                                  "--random_init", "pooler", *flags))
        err = capsys.readouterr().err
        assert (f"--random_init pooler: its weights start from random values and "
                f"{' '.join(map(str, flags))} keeps them so, while --pooling auto feeds the head "
                "the backbone's pooler_output through them") in err
        assert ("--lora_train" if "--lora_rank" in flags else "train it") in err
    train.main(train_args(small_data, folder, tmp_path / "mean", "--max_steps", 1,
                          "--skip_evaluation", "--random_init", "pooler", "--pooling", "mean",
                          "--train_only_head"))
    assert ("--random_init pooler: its weights start from random values and --train_only_head "
            "keeps them so; the head reads them only if") in capsys.readouterr().out
    # a two-tower folder without its vision tower's weights under any name
    folder = without_keys(family_folder("aimv2"), tmp_path / "aimv2",
                          lambda k: k.startswith("vision_model.encoder.layers.1."))
    with pytest.raises(MissingWeights, match=r"of Aimv2VisionModel .*'encoder\.layers\.1\."):
        load_backbone(folder)


def test_a_family_that_needs_a_missing_package_names_it_not_bad_weights(tmp_path):
    """DiNAT's model needs natten, which does not install with transformers: the error says the
    package is missing, not that the folder's weights cannot be read."""
    import importlib.util

    from transformers import DinatConfig, ViTImageProcessorPil
    if importlib.util.find_spec("natten"):
        pytest.skip("natten is installed")
    from safetensors.torch import save_file
    DinatConfig(embed_dim=16, depths=[1], num_heads=[1]).save_pretrained(tmp_path)
    save_file({"embeddings.norm.weight": torch.ones(16)}, tmp_path / "model.safetensors")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"a package its model needs does not import here: "
                       r"DinatModel requires the natten library") as e:
        load_backbone(str(tmp_path))
    assert "cannot load the model weights" not in str(e.value)


@pytest.mark.parametrize("name", ["aimv2", "metaclip_2", "clip", "blip-2", "chinese_clip"])
def test_a_vision_tower_reads_its_weights_from_the_whole_models_folder(name, family_folder):
    """The tower of a two-tower (or BLIP-2) folder holds exactly the whole model's tower weights,
    loaded whole or with its parameters on the meta device and read by weights.read_weights
    (the FSDP path), which keeps the buffers the model computed."""
    from transformers import AutoModel
    from weights import folder_map, read_weights
    folder = family_folder(name)
    backbone, _ = load_backbone(folder)
    whole = AutoModel.from_pretrained(folder)
    tower = next(m for m in whole.modules() if type(m) is type(backbone))
    expected = tower.state_dict()
    assert backbone.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    empty, _ = load_backbone(folder, meta=True)
    read_weights(empty, folder_map(empty, folder), torch.device("cpu"))
    assert all(torch.equal(v, expected[k]) for k, v in empty.state_dict().items())
    # and the buffers its code computes (CLIP's position ids, beside its meta class embedding)
    computed = dict(tower.named_buffers())
    assert all(torch.equal(v, computed[k]) for k, v in empty.named_buffers())


def test_vit_mae_keeps_every_patch_in_order(family_folder, capsys):
    """Its checkpoints drop 75 % of the patches at random, in evaluation too: the backbone
    is put in its fine-tuning setting (mask_ratio 0, patches in order), which is the plain
    ViT sequence: the same embeddings whatever the global random state."""
    from PIL import Image
    backbone, inputs = load_backbone(family_folder("vit_mae"))
    assert "mask_ratio 0.75); set to 0" in capsys.readouterr().out
    assert backbone.config.mask_ratio == 0
    batch = inputs([Image.new("RGB", (40, 40), (200, 10, 10))], ["digits"])
    with torch.no_grad():
        torch.manual_seed(1)
        first = backbone(**batch).last_hidden_state
        torch.manual_seed(2)
        second = backbone(**batch).last_hidden_state
        patches = backbone.embeddings.patch_embeddings.num_patches
        ordered = backbone(**batch, noise=torch.arange(patches)[None].float()).last_hidden_state
    assert first.shape[1] == 1 + patches  # the class token and every patch
    assert torch.equal(first, second) and torch.equal(first, ordered)


def test_a_processor_that_refuses_nested_images_gets_one_image_per_sample(family_folder):
    """GOT-OCR2's processor reads nested lists as the pages of one document and refuses them
    without multi_page: it gets the flat list, one image (256 <imgpad> tokens) per sample. The
    processors that read a flat list as one sample's images (Idefics3) keep their lists."""
    _, inputs = load_backbone(family_folder("got_ocr2"))
    images = [Image.new("RGB", (8, 8), color) for color in ((0, 0, 0), (255, 255, 255))]
    batch = inputs(images, ["digits", "faces"])
    pad = inputs.tokenizer.convert_tokens_to_ids("<imgpad>")
    assert not inputs.nested and (batch["input_ids"] == pad).sum(1).tolist() == [256, 256]
    assert len(batch["pixel_values"]) == 2
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert load_backbone(family_folder("idefics3"))[1].nested


def test_a_masking_model_whose_masking_cannot_be_found_is_refused(family_folder):
    """ViTMAE's masking is found by its embeddings' random_masking method; were it renamed (a
    later transformers), the model would train on a quarter of its patches, shuffled: refused."""
    from transformers import ViTMAEModel
    from backbone import fine_tuning_setting
    folder = family_folder("vit_mae")
    backbone = ViTMAEModel.from_pretrained(folder)
    backbone.embeddings.random_masking = None  # the method under another name
    with pytest.raises(ValueError, match="none of its modules has the random_masking method"):
        fine_tuning_setting(backbone, folder)


def test_what_a_model_returns_is_read_from_its_annotation_or_refused():
    """Whether a vision-language folder trains its vision tower alone is read from the output its
    model class is annotated to return (BLIP-2: vision outputs, no last hidden state); an
    annotation that does not resolve is an error, not a model that returns nothing."""
    from transformers import Blip2Model, Blip2VisionModel
    from backbone import output_fields
    assert {"vision_outputs", "qformer_outputs"} <= output_fields(Blip2Model)
    assert "last_hidden_state" not in output_fields(Blip2Model)

    class Unresolved(Blip2VisionModel):
        def forward(self, pixel_values) -> "OutputOfALaterRelease":  # noqa: F821
            return super().forward(pixel_values)
    with pytest.raises(ValueError, match="cannot read what Unresolved.forward returns"):
        output_fields(Unresolved)


def test_a_model_that_never_masks_is_left_as_it_is(family_folder, capsys):
    """HieraModel keeps its pre-training mask_ratio (0.6) in its config, but only
    HieraForPreTraining masks: nothing is changed and no note says patches are dropped."""
    backbone, _ = load_backbone(family_folder("hiera"))
    assert "drops patches" not in capsys.readouterr().out
    assert backbone.config.mask_ratio == 0.6 and not backbone._forward_pre_hooks


@pytest.mark.parametrize("name, pooling, reason", [
    ("vit_msn", "auto", "ViTMSNForImageClassification classifies the CLS token"),
    ("textnet", "auto", "its pooler output is a 2 x 2 average: train with --pooling mean"),
    ("pvt", "auto", "PvtForImageClassification classifies the CLS token"),
    ("hiera", "mean", "HieraForImageClassification classifies the pooler output"),
])
def test_export_names_the_pooling_its_class_reads(name, pooling, reason, family_folder,
                                                  tmp_path):
    """A checkpoint whose pooling the family's class cannot express is refused with the pooling
    it needs (ViTMSN, PVT: the CLS token; TextNet: fc(avgpool(...)) to 1 x 1, not its pooler;
    Hiera: its pooler, not the mean of its tokens)."""
    from model import save_classifier
    backbone, inputs = load_backbone(family_folder(name))
    model = MaskedClassifier(backbone, 2, pooling, inputs=inputs)
    info = {"num_labels": 2, "label_space": "shared", "pooling": pooling, "prompt": None,
            "datasets": {"faces": {"num_classes": 2, "eval_ratio": 1.0, "offset": 0}}}
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_classifier(model, inputs, str(folder), info)
    with pytest.raises(ExportError, match=re.escape(reason)):
        export(str(folder), "faces", str(tmp_path / "out"))
