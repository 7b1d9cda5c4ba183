"""What a data spec holds, cheaply: the content fingerprint that a resume compares with the one
its checkpoint kept, and that eval.py's "already evaluated on this data" is keyed on.

A spec's fingerprint is its units, each [files, bytes, digest]:
  folder  each class folder (and "." for images directly in the folder): every image file under
          it at any depth (relative path, size, modification time), in one order-free digest
  hf      each Parquet file (or each file of a save_to_disk folder): size, modification time, and
          a CRC-32 of its first and last 64 KB (a Parquet footer holds its row groups and counts)
  wds     each shard: size, modification time, and a CRC-32 of its first and last 64 KB
  jsonl   the file: size, and a hash of its whole text
  URL     the URL itself (nothing to read before the stream is)
Units are named relative to the spec's path, so a change names the class folder or the file. The
digest of a folder is a sum of per-file hashes, so no listing is sorted or held: a folder of
millions of images is read as one pass of stat calls (figures: tools/benchmark.py
--fingerprint). Modification times are part of a file's identity (a JSONL file's excepted: its
text is hashed), so a copy that does not keep them (cp without -p) reads as changed.
"""
import glob
import hashlib
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor

from data.folder import IMAGE_EXTENSIONS
from data.paths import expand_paths, expand_ranges, is_url
from data.specs import kind_named, parse_spec

BLOCK = 1 << 16  # bytes read at each end of a Parquet file or a shard
MASK = (1 << 64) - 1
SHOWN = 5  # changed units named per spec; the rest are counted


def data_fingerprint(text):
    """{"spec": text, "units": {name: [files, bytes, digest]}} of one data spec."""
    spec = parse_spec(text)
    if is_url(spec.path):
        return {"spec": text, "units": {url: [1, None, None] for url in expand_ranges(spec.path)}}
    if spec.kind == "folder":
        units = folder_units(spec.path)
    else:
        extension = kind_named(spec.kind).files  # as the readers list them (None: a file)
        paths = (list(spec.files) if spec.files else  # a split's files (PATH:SPLIT)
                 hf_files(spec.path) if spec.kind == "hf" and os.path.isdir(spec.path) else
                 expand_paths(spec.path, text, extension) if extension else [spec.path])
        identity = file_content if spec.kind == "jsonl" else file_stamp
        units = {unit_name(spec.path, p): [1, os.path.getsize(p), identity(p)] for p in paths}
    return {"spec": text, "units": units}


def data_fingerprints(specs):
    return [data_fingerprint(text) for text in specs or []]


def unit_name(root, path):
    """A file's name relative to the spec's path: its folder, or the folder of a glob."""
    base = root if os.path.isdir(root) else os.path.dirname(re.split(r"[*?[{]", root)[0])
    return os.path.relpath(path, base or ".")


def hf_files(folder):
    """A folder of Parquet files, or every file of a save_to_disk folder."""
    names = sorted(os.listdir(folder))
    if any(n.endswith(".parquet") for n in names):
        return [os.path.join(folder, n) for n in names if n.endswith(".parquet")]
    return sorted(p for p in glob.glob(os.path.join(folder, "**"), recursive=True)
                  if os.path.isfile(p))


def file_stamp(path):
    """A Parquet file's or a shard's identity: the CRC-32 of its first and last BLOCK bytes (a
    Parquet footer) and its modification time (a shard's middle rewritten in place, which its
    cached index notices by the same time)."""
    stat = os.stat(path)
    size = stat.st_size
    crc = crc_of_blocks(path, [0] + ([max(BLOCK, size - BLOCK)] if size > BLOCK else []))
    return f"{crc:08x}-{stat.st_mtime_ns}"


def crc_of_blocks(path, offsets, block_bytes=BLOCK):
    """One CRC-32 over the `block_bytes` bytes at each of `offsets` of a file."""
    crc = 0
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            crc = zlib.crc32(f.read(block_bytes), crc)
    return crc


def file_content(path):
    """A hash of a whole file (a JSONL file of 10M records: about a GB, read in 1 MB blocks)."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_units(root):
    """{class folder: [images, bytes, digest]} of an image folder ("." for its loose images);
    hidden entries and files that are not images are left out, as the reader leaves them."""
    classes, loose = {}, [0, 0, 0]
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                classes[entry.name] = entry.path
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                add_file(loose, entry, entry.name)
    top = root_id(root)
    with ThreadPoolExecutor(16) as pool:  # stat calls wait on the disk (a network one most)
        units = dict(zip(classes, pool.map(lambda name: walk_images(classes[name], name, {top}),
                                           classes)))
    if loose[0]:
        units["."] = loose
    return {name: [n, size, f"{digest:016x}"] for name, (n, size, digest) in sorted(units.items())}


def root_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk_images(folder, relative, seen):
    """[images, bytes, order-free digest] of the images under `folder`, symbolic links followed;
    a folder reached twice (a link loop) is counted once."""
    total = [0, 0, 0]
    stack = [(folder, relative)]
    while stack:
        path, name = stack.pop()
        try:
            key = root_id(path)
        except OSError:  # a dangling link to a folder: the reader names it
            continue
        if key in seen:
            continue
        seen.add(key)
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                inner = f"{name}/{entry.name}"
                if entry.is_dir():
                    stack.append((entry.path, inner))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    add_file(total, entry, inner)
    return total


def add_file(total, entry, name):
    try:
        st = entry.stat()
    except OSError:  # a dangling link: counted by name, the reader refuses it
        st = None
    size, mtime = (st.st_size, st.st_mtime_ns) if st else (-1, -1)
    digest = hashlib.blake2b(f"{name}\0{size}\0{mtime}".encode(), digest_size=8).digest()
    total[0] += 1
    total[1] += max(size, 0)
    total[2] = (total[2] + int.from_bytes(digest, "little")) & MASK


def data_changes(before, after, flag):
    """What differs between two lists of spec fingerprints of one flag, as one text per spec:
    "--train_data food=/data/food: class folder 'apple' 40 -> 41 files; 'zebra' added"."""
    old = {fp["spec"]: fp["units"] for fp in before or []}
    changes = []
    for fp in after or []:
        if fp["spec"] not in old:
            continue  # a spec of its own is a flag change, named with the flags
        was, now = old[fp["spec"]], fp["units"]
        found = [f"{name!r} added" for name in now if name not in was]
        found += [f"{name!r} removed" for name in was if name not in now]
        found += [unit_change(name, was[name], now[name]) for name in now
                  if name in was and was[name] != now[name]]
        if found:
            more = f"; ... {len(found) - SHOWN} more" if len(found) > SHOWN else ""
            changes.append(f"--{flag} {fp['spec']}: {'; '.join(found[:SHOWN])}{more}")
    return changes


def unit_change(name, was, now):
    if was[0] != now[0]:
        return f"{name!r} {was[0]:,} -> {now[0]:,} files"
    if was[1] != now[1]:
        return f"{name!r} {was[1]:,} -> {now[1]:,} bytes"
    return f"{name!r} modified"
