"""launch.sh: grad_accum from the batch sizes, pre-flight checks, Slurm, resume, and a real torchrun
run."""
import os
import subprocess

import pytest

from conftest import ROOT, read_jsonl

LAUNCH = os.path.join(ROOT, "launch.sh")


def launch(data, tiny_vit, out, **env):
    """bash launch.sh with the variables a user would edit, given through the environment."""
    variables = {
        "MODEL": tiny_vit, "TRAIN_DATA": f"{data['digits_train']} {data['faces_train']}",
        "VAL_DATA": f"{data['digits_val']} {data['faces_val']}", "DATASETS": data["registry"],
        "CONFIG": "", "SAVE_CKPT_PATH": str(out), "MAKE_DEMO_DATA": "0", "GPUS_PER_NODE": "1", **env
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", LAUNCH], capture_output=True, text=True, timeout=300,
        env={**clean, "OMP_NUM_THREADS": "1", **{k: str(v)
                                                 for k, v in variables.items()}})


def torchrun_line(result):
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("torchrun ")][0].split()


def flag(line, name):
    return line[line.index(name) + 1]


@pytest.mark.parametrize("mbs, gbs, gpus, nodes, accum", [
    (32, 32, 1, 1, 1), (4, 64, 8, 1, 2), (2, 64, 8, 2, 2), (1, 8, 8, 1, 1), (3, 96, 4, 2, 4)])
def test_dry_run_derives_grad_accum(small_data, tiny_vit, tmp_path, mbs, gbs, gpus, nodes, accum):
    result = launch(small_data, tiny_vit, tmp_path / "run", DRY_RUN=1, MBS=mbs, GBS=gbs,
                    GPUS_PER_NODE=gpus, NNODES=nodes, NODE_RANK=nodes - 1, MASTER_ADDR="node0",
                    DIST="fsdp")
    line = torchrun_line(result)
    assert (flag(line, "--nproc_per_node"), flag(line, "--batch_size"),
            flag(line, "--grad_accum")) == (str(gpus), str(mbs), str(accum))
    assert flag(line, "--dist") == "fsdp" and flag(line, "--output_dir") == str(tmp_path / "run")
    if nodes == 1:
        assert "--standalone" in line and "--master_addr" not in line
    else:
        assert (flag(line, "--nnodes"), flag(line, "--node_rank"), flag(line, "--master_addr")) == (
            str(nodes), str(nodes - 1), "node0")
    assert line[line.index("--train_data") + 1:line.index("--train_data") + 3] == [
        small_data["digits_train"], small_data["faces_train"]]
    assert "--resume" not in line and "--config" not in line
    assert not os.path.exists(tmp_path / "run")  # a dry run writes nothing


@pytest.mark.parametrize("env, message", [
    ({"MBS": 3, "GBS": 64, "GPUS_PER_NODE": 8
      }, "GBS=64 is not a multiple of MBS x GPUS_PER_NODE x NNODES = 3 x 8 x 1 = 24"),
    ({"MBS": 4, "GBS": 16, "GPUS_PER_NODE": 8}, "GBS=16 is not a multiple of"),
    ({"MBS": 0}, "MBS must be a positive integer, got '0'"),
    ({"NNODES": 2, "NODE_RANK": 2}, "NODE_RANK must be in 0..1, got '2'"),
    ({"DIST": "zero3"}, "DIST must be ddp, fsdp or hsdp"),
    ({"DIST": "hsdp", "GPUS_PER_NODE": 8, "SHARD_SIZE": 3}, "SHARD_SIZE must be a positive "
     "integer that divides GPUS_PER_NODE x NNODES = 8, got '3'"),
    ({"DIST": "fsdp", "SHARD_SIZE": 2}, "SHARD_SIZE is for DIST=hsdp"),
    ({"MODEL": "/no/such/model", "DATASETS": "/no/registry.json"
      }, "not found: MODEL=/no/such/model\nerror: not found: DATASETS=/no/registry.json"),
    ({"TRAIN_DATA": "food=folder:/no/food /no/shards-{000..009}.tar x=/no/*.parquet",
      "VAL_DATA": "/no/val.jsonl"}, "not found: TRAIN_DATA: food=folder:/no/food\n"
     "error: not found: VAL_DATA: /no/val.jsonl\n"),  # globs and ranges are train.py's to check
])
def test_bad_settings_are_refused_before_launching(small_data, tiny_vit, tmp_path, env, message):
    result = launch(small_data, tiny_vit, tmp_path / "run", DRY_RUN=1, **env)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "torchrun" not in result.stdout


@pytest.mark.parametrize("shard_size, expected", [(None, "8"), (4, "4")])
def test_hsdp_shards_within_a_node_by_default(small_data, tiny_vit, tmp_path, shard_size,
                                              expected):
    env = {"SHARD_SIZE": shard_size} if shard_size else {}
    line = torchrun_line(launch(small_data, tiny_vit, tmp_path / "run", DRY_RUN=1, MBS=1, GBS=32,
                                GPUS_PER_NODE=8, NNODES=4, NODE_RANK=0, MASTER_ADDR="node0",
                                DIST="hsdp", **env))
    assert flag(line, "--dist") == "hsdp" and flag(line, "--shard_size") == expected


def test_slurm_supplies_nodes_and_rank(small_data, tiny_vit, tmp_path):
    # What srun sets on the second node (MASTER_ADDR given: scontrol, which would name the first
    # node, is absent here).
    env = {
        "SLURM_JOB_ID": 7, "SLURM_NODEID": 1, "SLURM_NNODES": 2, "SLURM_NTASKS": 2,
        "SLURM_GPUS_ON_NODE": 4, "MASTER_ADDR": "gpu01"
    }
    result = subprocess.run(
        ["bash", LAUNCH], capture_output=True, text=True, timeout=60, env={
            **os.environ, **{k: str(v)
                             for k, v in env.items()}, "DRY_RUN": "1", "MAKE_DEMO_DATA": "0",
            "MBS": "2", "GBS": "32", "MODEL": tiny_vit, "TRAIN_DATA": small_data["digits_train"],
            "VAL_DATA": "", "DATASETS": small_data["registry"], "CONFIG": "",
            "SAVE_CKPT_PATH": str(tmp_path)
        })
    line = torchrun_line(result)
    assert (flag(line, "--nnodes"), flag(line, "--node_rank"), flag(line, "--nproc_per_node"),
            flag(line, "--master_addr"), flag(line,
                                              "--grad_accum")) == ("2", "1", "4", "gpu01", "2")
    # one task per GPU would start a torchrun per GPU: refused
    wrong = subprocess.run(["bash", LAUNCH], capture_output=True, text=True, timeout=60, env={
        **os.environ, **{k: str(v) for k, v in env.items()}, "SLURM_NTASKS": "8", "DRY_RUN": "1"})
    assert wrong.returncode == 1 and "srun --ntasks-per-node 1" in wrong.stderr


def test_launch_trains_logs_and_resumes_under_torchrun(small_data, tiny_vit, tmp_path):
    out = tmp_path / "run"
    common = dict(MBS=2, GBS=8, GPUS_PER_NODE=2, DIST="fsdp", LR="1e-2",
                  EXTRA_ARGS="--num_workers 0 --save_steps 2 --eval_steps 2 --logging_steps 1")
    first = launch(small_data, tiny_vit, out, NSTEP=2, **common)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "--grad_accum 2" in first.stdout and "--resume" not in first.stdout
    logs = [n for n in os.listdir(out) if n.startswith("run_") and n.endswith("_node0.log")]
    assert len(logs) == 1
    with open(out / logs[0]) as f:
        # train.py's output, teed
        assert "global batch 8 = micro batch 2 x 2 process(es) x grad_accum 2" in f.read()

    # a longer run than the checkpoint's changes its learning-rate schedule: said, and allowed
    longer = {**common, "EXTRA_ARGS": common["EXTRA_ARGS"] + " --allow_changed_flags"}
    second = launch(small_data, tiny_vit, out, NSTEP=4, **longer)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "--resume latest" in second.stdout and "resumed from" in second.stdout
    assert "continues with changed flags: --max_steps 2 -> --max_steps 4" in second.stdout
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_a_failed_run_exits_non_zero(small_data, tiny_vit, tmp_path):
    result = launch(small_data, tiny_vit, tmp_path / "run", NSTEP=2,
                    EXTRA_ARGS="--label_smoothing 2")
    assert result.returncode != 0 and "--label_smoothing must be in [0, 1)" in result.stdout
