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


class ClassificationMetrics:
    def __init__(self, dataset_names, num_classes, device="cpu"):
        self.names = list(dataset_names)
        self.num_classes = list(num_classes)
        self.sums = torch.zeros(len(self.names), 4, dtype=torch.float64, device=device)

    def update(self, losses, logits, targets, dataset_ids):
        """losses: per-sample loss; logits: masked logits; targets: head rows; dataset_ids: registry positions."""
        with torch.no_grad():
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            correct = top[:, 0] == targets
            top5 = (top == targets[:, None]).any(-1)
            values = torch.stack([losses.double(), correct.double(), top5.double(), torch.ones_like(losses, dtype=torch.float64)], 1)
            self.sums.index_add_(0, dataset_ids.to(self.sums.device), values.to(self.sums.device))

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        return self

    def reset(self):
        self.sums.zero_()

    def compute(self, prefix):
        """Named metrics: {prefix}_{dataset}_loss|accuracy|top5_accuracy|samples|correct and {prefix}_overall_*."""
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
            if all(k > 5 for k in self.num_classes):
                out[f"{prefix}_overall_top5_accuracy"] = total[TOP5] / total[COUNT]
            out[f"{prefix}_overall_samples"] = int(total[COUNT])
            out[f"{prefix}_overall_correct"] = int(total[CORRECT])
        return out


class GenerationMetrics:
    """Text cross-entropy and image MSE of the generation task: sums over target text tokens and noised
    image tokens, and their counts (same interface as ClassificationMetrics)."""

    def __init__(self, text_weight=1.0, image_weight=1.0, device="cpu"):
        self.weights = (text_weight, image_weight)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # text sum, text count, image sum, image count

    def update(self, text_sum, text_count, image_sum, image_count):
        values = [float(text_sum), text_count, float(image_sum), image_count]
        self.sums += torch.tensor(values, dtype=torch.float64, device=self.sums.device)

    all_reduce = ClassificationMetrics.all_reduce
    reset = ClassificationMetrics.reset

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
        out[f"{prefix}_text_tokens"], out[f"{prefix}_image_tokens"] = int(text_count), int(image_count)
        out[f"{prefix}_total_loss"] = total
        return out


def format_generation(metrics, prefix, title):
    parts = [f"{name} {metrics[f'{prefix}_{name}']:.4f}" for name in ("text_loss", "text_perplexity", "image_loss",
                                                                       "total_loss") if f"{prefix}_{name}" in metrics]
    return f"{title}: " + ", ".join(parts)


def format_table(metrics, prefix, dataset_names, title):
    """A readable per-dataset table of metrics computed with `prefix`."""
    rows = [name for name in dataset_names if f"{prefix}_{name}_samples" in metrics] + ["overall"]
    width = max(len(r) for r in rows + ["dataset"])
    lines = [title, f"  {'dataset':<{width}}  {'loss':>8}  {'accuracy':>9}  {'top5':>7}  {'correct':>9}  {'samples':>9}"]
    for name in rows:
        if f"{prefix}_{name}_samples" not in metrics:
            continue
        top5 = metrics.get(f"{prefix}_{name}_top5_accuracy")
        top5 = f"{100 * top5:6.2f}%" if top5 is not None else f"{'-':>7}"
        lines.append(f"  {name:<{width}}  {metrics[f'{prefix}_{name}_loss']:8.4f}  "
                     f"{100 * metrics[f'{prefix}_{name}_accuracy']:8.2f}%  {top5}  "
                     f"{metrics[f'{prefix}_{name}_correct']:9,}  {metrics[f'{prefix}_{name}_samples']:9,}")
    return "\n".join(lines)
