"""export.py: a checkpoint's dataset as a standard Hugging Face image classifier, checked through
transformers.pipeline against the checkpoint's own masked predictions."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from dataset import load_registry, make_loader, read_records
from export import ExportError, export
from backbone import load_backbone
from model import LabelSpace, MaskedClassifier, classify, save_classifier

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def save_backbone(folder, family):
    """A tiny random-init backbone folder of one family, with a PIL image processor."""
    import transformers
    from transformers import AutoModel, ViTImageProcessorPil
    config = {
        "vit": transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, image_size=16, patch_size=4),
        "convnext": transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                num_stages=2, patch_size=2),
        "resnet": transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                            depths=[1, 1], layer_type="basic"),
        "dinov2": transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, mlp_ratio=2, image_size=16,
                                            patch_size=4),
    }[family]
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)


def save_checkpoint(tmp_path, family, pooling, small_data):
    """A MaskedClassifier over digits (rows 0-9, named) and faces (rows 10-11) saved as training
    saves it; the head is scaled up so its predictions are far from ties."""
    backbone, inputs = load_backbone(save_backbone(tmp_path / f"{family}_backbone", family))
    model = MaskedClassifier(backbone, 12, pooling, inputs=inputs)
    torch.manual_seed(1)
    with torch.no_grad():
        model.head.weight.normal_(0, 3.0)
        model.head.bias.normal_(0, 1.0)
    info = {"num_labels": 12, "label_space": "disjoint", "pooling": pooling, "prompt": None,
            "no_logits_masking": False, "datasets": {
                "digits": {"num_classes": 10, "eval_ratio": 0.5, "offset": 0,
                           "labels": DIGIT_NAMES},
                "faces": {"num_classes": 2, "eval_ratio": 1.0, "offset": 10}}}
    folder = tmp_path / f"{family}_checkpoint"
    folder.mkdir()
    save_classifier(model, inputs, str(folder), info)
    return str(folder), model.eval(), inputs


def masked_predictions(model, inputs, small_data):
    """(records, masked logits) over every validation image, as eval.py computes them."""
    registry = load_registry(small_data["registry"])
    space = LabelSpace.build(list(registry), [s.num_classes for s in registry.values()],
                             "disjoint")
    records = read_records([small_data["digits_val"], small_data["faces_val"]], registry)
    num_classes, offsets = space.tensors("cpu")
    logits = []
    with torch.no_grad():
        for batch in make_loader(records, list(range(len(records))), inputs, space.names,
                                 batch_size=16, num_workers=0):
            logits.append(classify(model, batch, num_classes, offsets)[0])
    return records, torch.cat(logits)


@pytest.mark.parametrize("family,pooling", [("vit", "cls"), ("convnext", "auto"),
                                            ("resnet", "auto"), ("resnet", "mean"),
                                            ("dinov2", "auto")])
def test_pipeline_top1_equals_checkpoint(tmp_path, small_data, family, pooling):
    from transformers import AutoModelForImageClassification, pipeline
    checkpoint, model, inputs = save_checkpoint(tmp_path, family, pooling, small_data)
    records, logits = masked_predictions(model, inputs, small_data)
    for dataset, offset, k in [("digits", 0, 10), ("faces", 10, 2)]:
        out = str(tmp_path / f"export_{dataset}")
        export(checkpoint, dataset, out)
        loaded = AutoModelForImageClassification.from_pretrained(out)
        assert loaded.config.num_labels == k
        names = DIGIT_NAMES if dataset == "digits" else ["0", "1"]
        assert [loaded.config.id2label[i] for i in range(k)] == names
        classifier = pipeline("image-classification", model=out)
        mine = [i for i in range(len(records)) if records[i].dataset_id == (dataset == "faces")]
        paths = [records[i].image_path for i in mine]
        results = classifier(paths, top_k=k)
        compared = 0
        for i, result in zip(mine, results):
            rows = logits[i, offset:offset + k]
            assert torch.isinf(logits[i]).sum() == 12 - k  # masked outside the dataset's rows
            top2 = rows.topk(2).values
            scores = torch.tensor(sorted(r["score"] for r in result))
            torch.testing.assert_close(scores, torch.softmax(rows, 0).sort().values,
                                       atol=1e-4, rtol=0)
            if top2[0] - top2[1] > 1e-3:  # never compare the argmax of a near-tie
                assert result[0]["label"] == names[rows.argmax().item()]
                compared += 1
        assert compared >= len(mine) - 1


def test_refuses_pooling_the_class_cannot_express(tmp_path, small_data):
    checkpoint, _, _ = save_checkpoint(tmp_path, "vit", "auto", small_data)
    with pytest.raises(ExportError, match="pooler.*CLS token after the final layernorm"):
        export(checkpoint, "digits", str(tmp_path / "out"))
    checkpoint, _, _ = save_checkpoint(tmp_path, "convnext", "mean", small_data)
    with pytest.raises(ExportError, match="map_mean.*pooler output"):
        export(checkpoint, "digits", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ExportError, match="--dataset cats: .* knows digits, faces"):
        export(checkpoint, "cats", str(tmp_path / "out"))


def test_refuses_vision_language_checkpoint(tmp_path, tiny_qwen2_vl):
    backbone, inputs = load_backbone(tiny_qwen2_vl)
    model = MaskedClassifier(backbone, 2, "last", inputs=inputs)
    info = {"num_labels": 2, "label_space": "shared", "pooling": "last", "prompt": None,
            "datasets": {"faces": {"num_classes": 2, "eval_ratio": 1.0, "offset": 0}}}
    folder = tmp_path / "vlm_checkpoint"
    folder.mkdir()
    save_classifier(model, inputs, str(folder), info)
    with pytest.raises(ExportError, match="vision-language checkpoint"):
        export(str(folder), "faces", str(tmp_path / "out"))


def test_cli_names_the_reason(tmp_path, small_data):
    from conftest import run_script
    checkpoint, _, _ = save_checkpoint(tmp_path, "vit", "auto", small_data)
    result = run_script("export.py", checkpoint, "--dataset", "digits", tmp_path / "out")
    assert result.returncode != 0
    assert "error:" in result.stderr and "ViTForImageClassification" in result.stderr
    with open(os.path.join(checkpoint, "classifier.json")) as f:
        assert json.load(f)["pooling"] == "auto"


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_two_tower_vision_towers(tmp_path, family):
    """SigLIP's class averages every token (exported with --pooling mean, checked against the
    checkpoint's logits inside export); CLIP's averages pre-layernorm patch tokens: refused."""
    import transformers
    from transformers import AutoModelForImageClassification, ViTImageProcessorPil
    config_class, model_class = {"siglip": (transformers.SiglipConfig, transformers.SiglipModel),
                                 "clip": (transformers.CLIPConfig, transformers.CLIPModel)}[family]
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model_class(config_class(vision_config=dict(tower, image_size=16, patch_size=4),
                             text_config=dict(tower, vocab_size=100))).save_pretrained(
                                 tmp_path / "tower")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "tower")
    backbone, inputs = load_backbone(str(tmp_path / "tower"))
    model = MaskedClassifier(backbone, 3, "mean", inputs=inputs)
    info = {"num_labels": 3, "label_space": "shared", "pooling": "mean", "prompt": None,
            "datasets": {"d": {"num_classes": 3, "eval_ratio": 1.0, "offset": 0}}}
    (tmp_path / "checkpoint").mkdir()
    save_classifier(model, inputs, str(tmp_path / "checkpoint"), info)
    if family == "clip":
        with pytest.raises(ExportError, match="CLIPForImageClassification classifies the mean of "
                           "the patch tokens before post_layernorm"):
            export(str(tmp_path / "checkpoint"), "d", str(tmp_path / "out"))
        return
    export(str(tmp_path / "checkpoint"), "d", str(tmp_path / "out"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out"))
    assert type(loaded).__name__ == "SiglipForImageClassification"
    pixels = inputs([Image.new("RGB", (20, 20), (200, 30, 90))], ["d"])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels),
                                   atol=1e-5, rtol=1e-4)


def run_export(*args, fault=None, file_limit=None):
    """export.py as a user runs it; fault: MIXTRAIN_FAULT (a SIGKILL at that point); file_limit:
    no file this process writes may grow past that many bytes (EFBIG, as a full disk)."""
    import resource
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           **({"MIXTRAIN_FAULT": fault} if fault else {})}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
             ) if file_limit else None
    return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
                          preexec_fn=limit)


def exported(out):
    """(dataset, id2label) of a whole export folder, loaded as a user would."""
    from transformers import AutoModelForImageClassification
    with open(os.path.join(out, "export_info.json")) as f:
        info = json.load(f)
    model = AutoModelForImageClassification.from_pretrained(str(out))
    return info["dataset"], [model.config.id2label[i] for i in range(model.config.num_labels)]


def export_main(capsys, *args):
    """export.py's main in this process (where no process has to die): (exit code, stderr)."""
    import export as export_script
    capsys.readouterr()
    try:
        export_script.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_an_out_folder_that_is_not_an_export_is_refused_and_left_whole(tmp_path, small_data,
                                                                       capsys):
    checkpoint, _, _ = save_checkpoint(tmp_path, "resnet", "auto", small_data)
    run = tmp_path / "run"  # e.g. the run folder itself, given as OUT by mistake
    (run / "checkpoint-6").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"event": "train"}\n')
    code, err = export_main(capsys, checkpoint, run, "--dataset", "faces")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: OUT {run} is not an earlier export")
    assert sorted(os.listdir(run)) == ["checkpoint-6", "metrics.jsonl"]
    (run / "extra.txt").write_text("mine")  # an earlier export the user added a file to
    shutil.rmtree(run / "checkpoint-6")
    os.remove(run / "metrics.jsonl")
    (run / "export_info.json").write_text(json.dumps({"checkpoint": "c", "dataset": "faces",
                                                      "files": ["export_info.json"]}))
    code, err = export_main(capsys, checkpoint, run, "--dataset", "faces")
    assert code == 2 and "also holds extra.txt" in err
    assert (run / "extra.txt").read_text() == "mine"

    (tmp_path / "file").write_text("mine")
    code, err = export_main(capsys, checkpoint, tmp_path / "file", "--dataset", "faces")
    assert code == 2 and err == f"error: OUT {tmp_path / 'file'} is a file, not a folder\n"
    assert (tmp_path / "file").read_text() == "mine"
    # written: what the pipeline's decode does otherwise than training's is said
    import export as export_script
    export_script.main([str(checkpoint), str(tmp_path / "ok"), "--dataset", "faces"])
    assert "16-bit greyscale is clipped" in capsys.readouterr().out


@pytest.mark.fault("sigkill")
@pytest.mark.parametrize("point", ["kill_in_export:1", "kill_in_swap:1", "kill_in_swap:2"])
def test_an_earlier_export_survives_a_kill_at_any_point_of_its_replacement(tmp_path, small_data,
                                                                           point, capsys):
    """Killed while writing the new export, after moving the old one aside, or after moving the
    new one in: OUT (or its aside copy, put back by the next run) is always a whole export."""
    checkpoint, _, _ = save_checkpoint(tmp_path, "resnet", "auto", small_data)
    out = tmp_path / "exported"
    assert export_main(capsys, checkpoint, out, "--dataset", "digits")[0] == 0
    killed = run_export(checkpoint, out, "--dataset", "faces", fault=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    whole = out if out.exists() else tmp_path / ".old-exported"
    assert exported(whole)[0] == ("faces" if point == "kill_in_swap:2" else "digits")
    code, err = export_main(capsys, checkpoint, out, "--dataset", "cats")  # after the recovery
    assert code == 2 and "--dataset cats" in err
    assert exported(out)[0] == ("faces" if point == "kill_in_swap:2" else "digits")
    assert sorted(os.listdir(tmp_path)) == ["exported", "resnet_backbone", "resnet_checkpoint"]
    assert export_main(capsys, checkpoint, out, "--dataset", "faces")[0] == 0
    assert exported(out) == ("faces", ["0", "1"])


@pytest.mark.fault("disk full")
def test_a_full_disk_during_export_keeps_the_earlier_export(tmp_path, small_data, capsys):
    checkpoint, _, _ = save_checkpoint(tmp_path, "resnet", "auto", small_data)
    out = tmp_path / "exported"
    assert export_main(capsys, checkpoint, out, "--dataset", "digits")[0] == 0
    size = os.path.getsize(out / "model.safetensors")
    result = run_export(checkpoint, out, "--dataset", "faces", file_limit=size // 2)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: cannot write the export {out} (")
    assert "File too large" in result.stderr
    assert result.stderr.endswith("the earlier export is kept\n")
    assert exported(out)[0] == "digits"
    assert sorted(os.listdir(tmp_path)) == ["exported", "resnet_backbone", "resnet_checkpoint"]


def test_export_errors_exit_2_and_a_corrupt_classifier_json_is_named(tmp_path, small_data,
                                                                     capsys):
    checkpoint, _, _ = save_checkpoint(tmp_path, "vit", "auto", small_data)
    code, err = export_main(capsys, checkpoint, tmp_path / "out", "--dataset", "digits")
    assert code == 2 and "ViTForImageClassification" in err  # a ViT's pooler
    with open(os.path.join(checkpoint, "classifier.json"), "r+") as f:
        f.truncate(40)
    code, err = export_main(capsys, checkpoint, tmp_path / "out", "--dataset", "digits")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {os.path.join(checkpoint, 'classifier.json')}: cannot read it")
    assert not os.path.exists(tmp_path / "out")


def test_a_checkpoint_without_logits_masking_exports_every_row_and_agrees_with_eval_py(
        tmp_path, small_data, tiny_vit):
    """Unmasked, eval.py's prediction for a faces image may be any of the 12 head rows; the
    export keeps them all, so its top-1 is eval.py's."""
    from transformers import pipeline
    import eval as eval_script
    import train
    from conftest import read_jsonl, train_args
    run = tmp_path / "run"
    train.main(train_args(small_data, tiny_vit, run, "--max_steps", 2, "--skip_evaluation",
                          "--label_space", "disjoint", "--no_logits_masking", "--pooling", "cls",
                          "--lr", 1e-6))  # the head stays near its random start
    eval_script.main([str(run / "checkpoint-2"), "--num_workers", "0", "--predictions",
                      str(tmp_path / "preds.jsonl")])
    faces = [p for p in read_jsonl(tmp_path / "preds.jsonl") if p["dataset_name"] == "faces"]
    assert any(not 0 <= p["prediction"] < 2 for p in faces)  # outside the faces rows
    out = tmp_path / "faces"
    export(str(run / "checkpoint-2"), "faces", str(out))
    dataset, names = exported(out)
    assert len(names) == 12 and names[:3] == ["digits:0", "digits:1", "digits:2"]
    assert names[10:] == ["0", "1"]
    results = pipeline("image-classification", model=str(out))([p["image_path"] for p in faces],
                                                               top_k=2)
    compared = 0
    for p, result in zip(faces, results):
        if result[0]["score"] - result[1]["score"] > 1e-4:  # never the argmax of a near-tie
            assert result[0]["label"] == names[10 + p["prediction"]]
            compared += 1
    assert compared >= len(faces) - 1
