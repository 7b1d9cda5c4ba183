"""metrics.PerClassMetrics: sparse per-class counts, exact under torchrun, and their report."""
import json

import torch

from conftest import run_script
from metrics import PerClassMetrics, class_name, format_per_class

SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from metrics import PerClassMetrics
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data = torch.load(sys.argv[1])
m = PerClassMetrics(["digits", "food2k"], [10, 2000], [[str(i) for i in range(10)], None])
for start in range(rank * 7, len(data), world * 7):  # uneven shards, several updates per rank
    chunk = data[start:start + 7]
    m.update(chunk[:, 0], chunk[:, 1], chunk[:, 2])
result = m.all_reduce().compute()
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
"""


def random_samples(n=403, seed=0):
    """(dataset, label, prediction) rows: 10-class digits and a sparse 2000-class dataset."""
    g = torch.Generator().manual_seed(seed)
    dataset = torch.randint(0, 2, (n,), generator=g)
    k = torch.where(dataset == 0, 10, 2000)
    label = (torch.rand(n, generator=g) * k).long()
    wrong = torch.rand(n, generator=g) < 0.3
    prediction = torch.where(wrong, (torch.rand(n, generator=g) * k).long(), label)
    return torch.stack([dataset, label, prediction], 1)


def test_counts_by_hand():
    m = PerClassMetrics(["a"], [3], [["cat", "dog", "fox"]])
    m.update(torch.tensor([0, 0, 0, 0, 0]), torch.tensor([0, 1, 1, 1, 2]),
             torch.tensor([0, 2, 2, 1, 2]))
    result = m.compute()["a"]
    assert (result["samples"], result["correct"]) == (5, 3)
    by_name = {c["name"]: c for c in result["classes"]}
    assert by_name["dog"]["support"] == 3 and by_name["dog"]["accuracy"] == 1 / 3
    assert by_name["fox"]["predicted"] == 3 and by_name["fox"]["precision"] == 1 / 3
    assert by_name["cat"]["f1"] == 1.0
    assert result["confusion"] == [[0, 0, 1], [1, 1, 1], [1, 2, 2], [2, 2, 1]]
    assert result["matrix"] == [[1, 0, 0], [0, 1, 2], [0, 0, 1]]
    report = format_per_class(m.compute())
    assert "dog -> fox: 2" in report
    assert report.index("dog") < report.index("cat")  # worst class first
    assert class_name(None, 4) == "4" and class_name(["x"], 3) == "3"


def test_long_class_names_keep_the_per_class_table_aligned():
    long = "a very long class name that goes on and on " * 3
    names = [long + "one", "dog", long + "two"]
    m = PerClassMetrics(["a"], [3], [names])
    m.update(torch.tensor([0] * 6), torch.tensor([0, 0, 1, 1, 2, 2]),
             torch.tensor([0, 2, 1, 1, 2, 0]))
    lines = format_per_class(m.compute()).splitlines()
    rows = lines[lines.index("  worst classes (accuracy, correct/support, precision):") + 1:][:3]
    assert len({row.index("%") for row in rows}) == 1  # every accuracy in one column
    assert all(len(row) < 80 for row in lines)
    assert (long + "one")[:21] + "..." in lines[2] and "dog" in "".join(rows)
    assert m.compute()["a"]["classes"][0]["name"] == long + "one"  # the JSON keeps it whole


def test_sparse_for_many_classes_and_json():
    data = random_samples()
    m = PerClassMetrics(["digits", "food2k"], [10, 2000])
    m.update(data[:, 0], data[:, 1], data[:, 2])
    result = json.loads(json.dumps(m.compute()))
    assert "matrix" in result["digits"] and "matrix" not in result["food2k"]
    assert len(result["food2k"]["classes"]) < 2000  # only classes seen
    assert sum(r["samples"] for r in result.values()) == len(data)
    assert sum(t[2] for t in result["food2k"]["confusion"]) == (data[:, 0] == 1).sum().item()


def test_exact_under_two_processes(tmp_path):
    data = random_samples()
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "per_class_ranks.py").write_text(SCRIPT)
    out = tmp_path / "per_class.json"
    result = run_script(str(tmp_path / "per_class_ranks.py"), tmp_path / "data.pt", out,
                        torchrun=2, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    single = PerClassMetrics(["digits", "food2k"], [10, 2000], [[str(i) for i in range(10)], None])
    single.update(data[:, 0], data[:, 1], data[:, 2])
    assert json.loads(out.read_text()) == json.loads(json.dumps(single.compute()))


def test_class_names_flow_into_predictions_and_per_class_json(small_data, tiny_vit, tmp_path):
    # Names from a list (digits) and from a text file beside the registry (faces); eval.py
    # --per_class writes the same JSON on 1 and 2 processes.
    import eval as eval_script
    import train
    from conftest import read_jsonl, run_script, train_args
    with open(tmp_path / "faces.txt", "w") as f:
        f.write("not a face\nface\n")
    registry = tmp_path / "datasets.json"
    with open(registry, "w") as f:
        json.dump({"digits": {"num_classes": 10, "eval_ratio": 0.5, "hflip": False,
                              "labels": [f"digit {i}" for i in range(10)]},
                   "faces": {"num_classes": 2, "labels": "faces.txt"}}, f)
    data = {**small_data, "registry": str(registry)}
    run_dir = tmp_path / "run"
    train.main(train_args(data, tiny_vit, run_dir, "--max_steps", 2, "--save_steps", 2,
                          "--eval_steps", 2, "--no_final_eval"))
    eval_script.main([str(run_dir), "--num_workers", "0", "--per_class", "--predictions",
                      str(tmp_path / "preds.jsonl")])
    preds = read_jsonl(tmp_path / "preds.jsonl")
    assert len(preds) == 31
    for p in preds:
        names = ([f"digit {i}" for i in range(10)] if p["dataset_name"] == "digits"
                 else ["not a face", "face"])
        assert p["label_name"] == names[p["label"]]
        assert p["prediction_name"] == names[p["prediction"]]
    with open(run_dir / "per_class" / "checkpoint-2.json") as f:
        one = json.load(f)
    support = {name: sum(c["support"] for c in d["classes"]) if isinstance(d["classes"], list)
               else sum(c["support"] for c in d["classes"].values())
               for name, d in one["datasets"].items()}
    assert support == {"digits": 21, "faces": 10}
    assert "digit" in json.dumps(one["datasets"]["digits"])
    result = run_script("eval.py", run_dir, "--num_workers", "0", "--per_class", "--force",
                        torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "per_class" / "checkpoint-2.json") as f:
        two = json.load(f)
    assert two["datasets"] == one["datasets"]
