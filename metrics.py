"""Per-dataset and overall classification metrics, and the generation task's text / image losses,
kept as sums and counts.

Sums can be all-reduced exactly across ranks, so every sample counts once whatever the
world size; means are taken only when the numbers are reported.
"""
import math

import torch
import torch.distributed as dist

# Columns of the per-dataset sums tensor.
LOSS, CORRECT, TOP5, COUNT = range(4)


class PerDatasetSums:
    """Metrics kept as a float64 tensor of sums, `self.sums`: all-reduced exactly."""

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        return self

    def reset(self):
        self.sums.zero_()


class PerDatasetLoss(PerDatasetSums):
    """The mean per-sample loss of each dataset and overall: what a task without metrics of its
    own reports (tasks/base.py)."""

    def __init__(self, dataset_names, device="cpu"):
        self.names = list(dataset_names)
        self.sums = torch.zeros(len(self.names), 2, dtype=torch.float64, device=device)

    def update(self, losses, dataset_ids, **_):
        with torch.no_grad():
            values = torch.stack([losses.double(), torch.ones_like(losses, dtype=torch.float64)], 1)
            self.sums.index_add_(0, dataset_ids.to(self.sums.device), values.to(self.sums.device))

    def compute(self, prefix):
        """{prefix}_{dataset}_loss|samples, and the same for overall."""
        rows = [*zip(self.names, self.sums.cpu().tolist()), ("overall",
                                                              self.sums.sum(0).cpu().tolist())]
        out = {}
        for name, (loss, count) in rows:
            if count:
                out[f"{prefix}_{name}_loss"], out[f"{prefix}_{name}_samples"] = loss / count, int(
                    count)
        return out


class ClassificationMetrics(PerDatasetSums):
    def __init__(self, dataset_names, num_classes, device="cpu"):
        self.names = list(dataset_names)
        self.num_classes = list(num_classes)
        self.sums = torch.zeros(len(self.names), 4, dtype=torch.float64, device=device)

    def update(self, losses, logits, targets, dataset_ids):
        """losses: per-sample loss; logits: masked logits; targets: head rows; dataset_ids: registry
        positions."""
        with torch.no_grad():
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            correct = top[:, 0] == targets
            top5 = (top == targets[:, None]).any(-1)
            values = torch.stack([
                losses.double(),
                correct.double(),
                top5.double(),
                torch.ones_like(losses, dtype=torch.float64)
            ], 1)
            self.sums.index_add_(0, dataset_ids.to(self.sums.device), values.to(self.sums.device))

    def compute(self, prefix):
        """Named metrics: {prefix}_{dataset}_loss|accuracy|top5_accuracy|samples|correct and
        {prefix}_overall_*."""
        sums = self.sums.cpu().tolist()
        out = {}
        for name, k, (loss, correct, top5, count) in zip(self.names, self.num_classes, sums):
            if count == 0:
                continue
            out[f"{prefix}_{name}_loss"] = loss / count
            out[f"{prefix}_{name}_accuracy"] = correct / count
            if k > 5:  # top-5 is always 1 with five or fewer valid classes
                out[f"{prefix}_{name}_top5_accuracy"] = top5 / count
            out[f"{prefix}_{name}_samples"] = int(count)
            out[f"{prefix}_{name}_correct"] = int(correct)
        total = [sum(col) for col in zip(*sums)] if sums else [0, 0, 0, 0]
        if total[COUNT]:
            out[f"{prefix}_overall_loss"] = total[LOSS] / total[COUNT]
            out[f"{prefix}_overall_accuracy"] = total[CORRECT] / total[COUNT]
            # the datasets evaluated here (as tasks.classify.check_flags names the metrics)
            if all(k > 5 for k, row in zip(self.num_classes, sums) if row[COUNT]):
                out[f"{prefix}_overall_top5_accuracy"] = total[TOP5] / total[COUNT]
            out[f"{prefix}_overall_samples"] = int(total[COUNT])
            out[f"{prefix}_overall_correct"] = int(total[CORRECT])
        return out


class GenerationMetrics(PerDatasetSums):
    """Text cross-entropy and image MSE of the generation task: sums over target text tokens and
    noised image tokens, and their counts (same interface as ClassificationMetrics)."""

    def __init__(self, text_weight=1.0, image_weight=1.0, device="cpu"):
        self.weights = (text_weight, image_weight)
        # text sum, text count, image sum, image count
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, text_sum, text_count, image_sum, image_count):
        values = [float(text_sum), text_count, float(image_sum), image_count]
        self.sums += torch.tensor(values, dtype=torch.float64, device=self.sums.device)

    def compute(self, prefix):
        """{prefix}_text_loss, _text_perplexity, _text_tokens, _image_loss, _image_tokens and
        _total_loss = text_weight * text_loss + image_weight * image_loss."""
        text_sum, text_count, image_sum, image_count = self.sums.cpu().tolist()
        out, total = {}, 0.0
        if text_count:
            out[f"{prefix}_text_loss"] = text_sum / text_count
            out[f"{prefix}_text_perplexity"] = math.exp(min(text_sum / text_count, 50))
            total += self.weights[0] * out[f"{prefix}_text_loss"]
        if image_count:
            out[f"{prefix}_image_loss"] = image_sum / image_count
            total += self.weights[1] * out[f"{prefix}_image_loss"]
        out[f"{prefix}_text_tokens"], out[f"{prefix}_image_tokens"] = int(text_count), int(
            image_count)
        out[f"{prefix}_total_loss"] = total
        return out


def format_generation(metrics, prefix, title):
    parts = [
        f"{name} {metrics[f'{prefix}_{name}']:.4f}"
        for name in ("text_loss", "text_perplexity", "image_loss", "total_loss")
        if f"{prefix}_{name}" in metrics
    ]
    return f"{title}: " + ", ".join(parts)


def format_table(metrics, prefix, dataset_names, title):
    """A readable per-dataset table of metrics computed with `prefix`."""
    rows = [name for name in dataset_names if f"{prefix}_{name}_samples" in metrics] + ["overall"]
    width = max(len(r) for r in rows + ["dataset"])
    lines = [
        title,
        f"  {'dataset':<{width}}  {'loss':>8}  {'accuracy':>9}  {'top5':>7}  {'correct':>9}  "
        f"{'samples':>9}"
    ]
    for name in rows:
        if f"{prefix}_{name}_samples" not in metrics:
            continue
        top5 = metrics.get(f"{prefix}_{name}_top5_accuracy")
        top5 = f"{100 * top5:6.2f}%" if top5 is not None else f"{'-':>7}"
        lines.append(
            f"  {name:<{width}}  {metrics[f'{prefix}_{name}_loss']:8.4f}  "
            f"{100 * metrics[f'{prefix}_{name}_accuracy']:8.2f}%  {top5}  "
            f"{metrics[f'{prefix}_{name}_correct']:9,}  {metrics[f'{prefix}_{name}_samples']:9,}")
    return "\n".join(lines)


def class_name(names, index):
    """The name of class `index` of a dataset (`names`: its class names or None); the index as
    text where there are no names or the index is outside them (an unmasked prediction)."""
    return names[index] if names and 0 <= index < len(names) else str(index)


class PerClassMetrics:
    """Per-class counts of each dataset as a sparse confusion, (dataset, label, prediction) ->
    count: datasets with thousands of classes cost memory per distinct pair seen, not K x K.

    Labels and predictions are class indices inside the sample's own dataset (head row minus the
    dataset's offset); a prediction outside [0, K) is possible only without logits masking.
    all_reduce gathers every rank's (dataset, label, prediction, count) quadruples and sums them,
    so the counts are exact under torchrun whatever the world size.
    """

    def __init__(self, dataset_names, num_classes, class_names=None):
        self.names = list(dataset_names)
        self.num_classes = list(num_classes)
        self.class_names = list(class_names) if class_names else [None] * len(self.names)
        self.counts = {}

    def update(self, dataset_ids, labels, predictions):
        """dataset_ids, labels, predictions: 1-D integer tensors of one batch."""
        triples = torch.stack([dataset_ids, labels, predictions], 1).long().cpu()
        if not len(triples):
            return
        unique, counts = triples.unique(dim=0, return_counts=True)
        for key, count in zip(map(tuple, unique.tolist()), counts.tolist()):
            self.counts[key] = self.counts.get(key, 0) + count

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, [(*k, c) for k, c in sorted(self.counts.items())])
            self.counts = {}
            for part in parts:
                for d, y, p, c in part:
                    self.counts[(d, y, p)] = self.counts.get((d, y, p), 0) + c
        return self

    def reset(self):
        self.counts = {}

    def compute(self, dense_limit=50):
        """JSON-ready per-dataset results: samples, correct, accuracy; `classes`, one entry per
        class seen as a label or a prediction (index, name, support, predicted, correct,
        accuracy = recall, precision, f1; null where undefined); `confusion`, sparse
        [label, prediction, count] triples (diagonal included); and `matrix`, the dense K x K
        counts (rows: labels), only for K <= dense_limit."""
        out = {}
        for d, (name, k, names) in enumerate(zip(self.names, self.num_classes, self.class_names)):
            pairs = sorted((y, p, c) for (dd, y, p), c in self.counts.items() if dd == d)
            if not pairs:
                continue
            support, predicted, correct = {}, {}, {}
            for y, p, c in pairs:
                support[y] = support.get(y, 0) + c
                predicted[p] = predicted.get(p, 0) + c
                if y == p:
                    correct[y] = c
            classes = []
            for i in sorted(set(support) | set(predicted)):
                s, n, c = support.get(i, 0), predicted.get(i, 0), correct.get(i, 0)
                recall = c / s if s else None
                precision = c / n if n else None
                f1 = (2 * c / (s + n)) if s + n else None
                classes.append({"index": i, "name": class_name(names, i), "support": s,
                                "predicted": n, "correct": c, "accuracy": recall,
                                "precision": precision, "recall": recall, "f1": f1})
            total, right = sum(support.values()), sum(correct.values())
            result = {"num_classes": k, "samples": total, "correct": right,
                      "accuracy": right / total, "classes": classes,
                      "confusion": [list(t) for t in pairs]}
            if k <= dense_limit and all(0 <= p < k for _, p, _ in pairs):
                matrix = [[0] * k for _ in range(k)]
                for y, p, c in pairs:
                    matrix[y][p] = c
                result["matrix"] = matrix
            out[name] = result
        return out


NAME_WIDTH = 24  # columns of a class name in the per-class report


def shorten(name, width=NAME_WIDTH):
    """`name` cut to `width` characters, the cut marked with "...", so columns stay aligned."""
    return name if len(name) <= width else name[:width - 3] + "..."


def format_per_class(per_class, worst=5, pairs=5):
    """Text report of `PerClassMetrics.compute()`: per dataset, the `worst` classes by accuracy
    (recall) and the `pairs` most frequent (label -> prediction) confusions, by class name (cut
    to NAME_WIDTH characters; the JSON keeps the whole names)."""
    lines = []
    for name, result in per_class.items():
        lines.append(f"{name}: {result['correct']:,}/{result['samples']:,} correct "
                     f"({100 * result['accuracy']:.2f}%), {result['num_classes']} classes")
        seen = [c for c in result["classes"] if c["support"]]
        seen.sort(key=lambda c: (c["accuracy"], -c["support"], c["index"]))
        if seen:
            lines.append("  worst classes (accuracy, correct/support, precision):")
        for c in seen[:worst]:
            precision = "-" if c["precision"] is None else f"{100 * c['precision']:.1f}%"
            lines.append(f"    {shorten(c['name']):<{NAME_WIDTH}} {100 * c['accuracy']:6.1f}%  "
                         f"{c['correct']:>6}/{c['support']:<6}  {precision}")
        names = {c["index"]: c["name"] for c in result["classes"]}
        confused = sorted((t for t in result["confusion"] if t[0] != t[1]),
                          key=lambda t: (-t[2], t[0], t[1]))
        if confused:
            lines.append("  most confused (label -> prediction: count):")
        for y, p, c in confused[:pairs]:
            lines.append(f"    {shorten(names[y])} -> {shorten(names[p])}: {c}")
    return "\n".join(lines)
