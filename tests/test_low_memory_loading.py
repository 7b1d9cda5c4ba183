"""--dist fsdp builds the backbone on the meta device, shards it and has each rank read only its
shards of the folder's safetensors: the same weights and buffers as loading the whole model, on
every rank, for train.py and eval.py (2 gloo processes)."""
import train
from conftest import run_script, train_args


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
