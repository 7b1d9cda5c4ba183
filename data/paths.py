"""Paths of data specs: URLs, {000..099} ranges, globs and a folder's files."""
import glob
import os
import re

from data.types import DataError


def is_url(path):
    return "://" in path


# A URL is streamed: training specs only (validation and eval.py read their data whole).
URL_READ = ("a URL is read only as a training stream (train.py --streaming, --train_data); to "
            "validate or evaluate on remote data, download its files first (for example `hf "
            "download REPO --repo-type dataset --local-dir DIR`, or curl) and give the local path")


def spec_files(spec, extension):
    """The files of a spec: its split's files, or those of its path (expand_paths)."""
    return list(spec.files) if spec.files else expand_paths(spec.path, spec.text, extension)


def expand_paths(path, text, extension=None):
    """The files of a path: {000..099} ranges and globs expanded, a folder's files ending in
    `extension`; sorted within each pattern. A pattern that matches nothing is an error."""
    if is_url(path):
        return expand_ranges(path)
    out = []
    for pattern in expand_ranges(path):
        if os.path.isdir(pattern) and extension:
            files = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.endswith(extension))
            if not files:
                what = extension if isinstance(extension, str) else "/".join(extension)
                raise DataError(f"data spec {text!r}: no {what} files in {pattern}")
            out += files
        elif any(c in pattern for c in "*?["):
            files = sorted(glob.glob(pattern))
            if not files:
                raise DataError(f"data spec {text!r}: no file matches {pattern}")
            out += files
        elif os.path.isfile(pattern):
            out.append(pattern)
        else:
            raise DataError(f"data spec {text!r}: {pattern} not found")
    return out


def expand_ranges(path):
    """shard-{000..002}.tar -> shard-000.tar, shard-001.tar, shard-002.tar (zero-padded as the
    first bound is written); several ranges multiply."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", path)
    if not match:
        return [path]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = path[:match.start()], path[match.end():]
    return [p for i in range(int(first), int(last) + 1)
            for p in expand_ranges(f"{head}{i:0{width}d}{tail}")]
