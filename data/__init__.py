"""The data layer. dataset.py, at the top level, is what the rest of the code imports it through.

Its modules from the bottom up; each imports only from modules listed before it:
  types.py        DataError, the registry's DatasetSpec, a parsed Spec, the RecordTable and the
                  Source each record names
  paths.py        a spec's paths: URLs, {000..099} ranges, globs, a folder's files
  jsonl.py        a reader per kind of source: JSONL records; image folders (and the hub's
  folder.py       metadata files); Hugging Face datasets and Parquet; WebDataset shards, read
  hf.py           through the index of each shard's members (tar_index.py)
  tar_index.py
  wds.py
  specs.py        spec parsing, KINDS (the detection table: each kind's reader and what makes a
                  path its kind), split layouts
  reading.py      read_records: every spec's records checked into one RecordTable
  sampling.py     an epoch's order, the weighted mixture, the stream's schedule (one
                  largest-remainder quota for both), the partial evaluation subset
  registry.py     the dataset registry (--datasets)
  stream.py       --streaming: Parquet files or shards read as a stream, resumed exactly
  loaders.py      the DataLoaders over records and over the stream, their batches and workers
  fingerprint.py  the data's content, compared on resume and by eval.py
"""
