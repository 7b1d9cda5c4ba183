"""--dist fsdp builds the backbone on the meta device, shards it and has each rank read only its
shards of the folder's safetensors: the same weights and buffers as loading the whole model, on
every rank, for train.py and eval.py (2 gloo processes)."""
import os

import train
from conftest import ROOT, run_script, train_args


def test_sharded_loading_equals_whole_loading_on_every_rank(small_data, tiny_qwen2_5_vl,
                                                            tmp_path):
    # The Qwen2.5-VL folder holds keys that transformers renames on loading and rotary inv_freq
    # buffers that are not in any file; its fp32 weights are read into bf16 parameters (fp32
    # into fp32: test_scale_out's FSDP2 runs of a ViT folder and test_eval_cache).
    folder = tiny_qwen2_5_vl
    common = ["--param_dtype", "bf16"]
    train.main(train_args(small_data, folder, tmp_path / "one", "--max_steps", 1,
                          "--skip_evaluation", "--lr", 1e-2, *common))
    result = run_script("tests/sharded_loading.py", tmp_path / "one" / "checkpoint-1",
                        *train_args(small_data, folder, tmp_path / "two", "--dist", "fsdp",
                                    *common), torchrun=2, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "each process reads only its shards of the weights" in result.stdout
    assert "rank 0: equal" in result.stdout and "rank 1: equal" in result.stdout
    # eval.py's shards are the checkpoint's bf16 pages, memory-mapped, not private copies;
    # train.py converts the folder's fp32 into bf16 parameters, so it reads into its own memory
    for rank in (0, 1):
        assert (f"rank {rank}: equal (58 sharded entries in train.py, 58 in eval.py); "
                "memory-mapped: train.py {}, eval.py {'model.safetensors': 56, "
                "'head.safetensors': 2}") in result.stdout, result.stdout[-3000:]


LAUNCHER = """import runpy, sys
import transformers.core_model_loading as loading
import transformers.modeling_utils  # noqa: F401  (binds the helper for its own use first)
del loading.revert_weight_conversion  # as in a transformers release without it
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_without_the_renaming_helpers_every_process_reads_the_whole_model(small_data, tiny_vit,
                                                                          tmp_path):
    """transformers' key-renaming helpers are not public API: with one of them genuinely absent
    (deleted from transformers before the project imports it), --dist fsdp says so in one line,
    reads the whole folder on every process and trains as one process does; its checkpoint
    (under the model's own names) loads back."""
    from conftest import assert_same_adam_steps
    from model import load_classifier
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    steps = ["--max_steps", 3, "--skip_evaluation", "--lr", 1e-2, "--pooling", "mean"]
    train.main(train_args(small_data, tiny_vit, tmp_path / "one", *steps, "--batch_size", 8))
    result = run_script(launcher, os.path.join(ROOT, "train.py"),
                        *train_args(small_data, tiny_vit, tmp_path / "two", *steps,
                                    "--batch_size", 4, "--dist", "fsdp"), torchrun=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "key-renaming helpers" in line]
    assert len(notes) == 1 and "revert_weight_conversion" in notes[0], result.stdout[-3000:]
    assert notes[0].endswith("every process reads the whole model")
    assert "each process reads only its shards" not in result.stdout
    one, two = (load_classifier(str(tmp_path / run / "checkpoint-3"))[0].state_dict()
                for run in ("one", "two"))
    assert_same_adam_steps(one, two, lr=1e-2, steps=3)
