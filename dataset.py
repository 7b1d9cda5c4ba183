"""The mixed dataset: what train.py, eval.py, config.py and the tasks use of the data layer
(data/, whose modules name its parts): the registry, the records of every data spec read and
checked, their sampling, the loaders and the training stream.

    python dataset.py --make-demo DIR   # writes the built-in demo (digits + faces PNGs, JSONL,
    registry); demo.py
    python dataset.py --make-demo DIR --format folder|parquet|wds   # the same in another layout
"""
from data.jsonl import check_split_field, json_items
from data.loaders import (PREFETCH_FACTOR, EpochSampler, ImageDataset, auto_num_workers,
                          make_loader, make_stream_loader, pixel_path, start_worker,
                          worker_options)
from data.reading import check_classes, images_also_in, read_records, say_trained_in_val
from data.registry import load_registry, read_yaml
from data.sampling import (check_training_samples, count_per_dataset, mixture_indices,
                           partial_eval_indices, plan_epochs, summarize, train_indices)
from data.specs import absolute_spec, parse_spec
from data.stream import SPLIT_VERSION, build_stream
from data.tar_index import INDEX_DIR
from data.types import DataError, DatasetSpec, RecordTable, raise_data_errors

__all__ = [  # what the rest of the code imports from the data layer
    "INDEX_DIR", "PREFETCH_FACTOR", "SPLIT_VERSION", "DataError", "DatasetSpec", "EpochSampler",
    "ImageDataset", "RecordTable", "absolute_spec", "auto_num_workers", "build_stream",
    "check_classes", "check_split_field", "check_training_samples", "count_per_dataset",
    "images_also_in", "json_items", "load_registry", "make_loader", "make_stream_loader",
    "mixture_indices", "parse_spec", "partial_eval_indices", "pixel_path", "plan_epochs",
    "raise_data_errors", "read_records", "read_yaml", "say_trained_in_val", "start_worker",
    "summarize", "train_indices", "worker_options",
]

if __name__ == "__main__":
    from demo import main
    main()
