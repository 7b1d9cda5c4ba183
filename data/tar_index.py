"""The index of a WebDataset shard: per sample (in the shard's order) its member name, image
offset and size, and label (an index or a class name), built once by reading the tar headers
(and the label members) and kept beside the shard, or under the run's folder where the shard's
folder is read-only. A damaged header, a cut shard or a repeated key is an error naming it."""
import hashlib
import json
import os
import re
import tarfile
import zipfile

import numpy as np

from data.types import NO_IMAGE, NO_LABEL, DataError, as_bytes, first_problems

TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # the first a sample has is its image
INDEX_SUFFIX = ".index.npz"
INDEX_DIR = "tar_index"  # in a run's folder: the indexes of shards whose folder is read-only
INDEX_VERSION = 3  # 2: damaged headers, cut shards and repeated keys are errors; 3: class names
TAR_LABEL_FIELDS = ("cls", "json", "txt")  # the first a sample has gives its label


def no_image_member(sample):
    """The problem of a shard's sample (SHARD:KEY) that has none of TAR_IMAGE_FIELDS."""
    return f"{sample}: no image member (.{', .'.join(TAR_IMAGE_FIELDS)})"


def load_tar_index(shard, index_dir=None):
    """The index of a shard: per sample (in the shard's order) its member name, image offset and
    size (NO_IMAGE without an image) and label (NO_LABEL without one). Read from its cache when the
    shard is unchanged (size, mtime), else built by reading the headers (and the .cls / .json
    members) and cached beside the shard, or in index_dir where that folder is read-only."""
    stat = os.stat(shard)
    stamp = np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    places = [shard + INDEX_SUFFIX]
    if index_dir:
        digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
        places.append(os.path.join(index_dir, f"{digest}-{os.path.basename(shard)}{INDEX_SUFFIX}"))
    for place in places:
        try:
            with np.load(place, allow_pickle=False) as cached:
                if np.array_equal(cached["stamp"], stamp):
                    return {k: cached[k] for k in ("members", "offsets", "sizes", "labels",
                                                   "names")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            continue
    index = build_tar_index(shard, stat.st_size)
    for place in places:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(place)), exist_ok=True)
            temporary = f"{place}.tmp-{os.getpid()}"
            with open(temporary, "wb") as f:
                np.savez(f, stamp=stamp, **index)
            os.replace(temporary, place)
            return index
        except OSError:
            continue
    return index  # nowhere writable: built again next time


def sample_key(name):
    """WebDataset's split of a member name: (key, field) at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    key, dot, field = base.partition(".")
    if not dot or not key:
        return None, None
    return (f"{folder}/{key}" if folder else key), field


def build_tar_index(shard, size):
    """Read a shard's headers once; the .cls / .json members are read for their labels. tarfile
    takes a damaged or short header for the end of the archive, so where it stopped is checked
    (tar_end_problem): else the samples after it would be lost without a word."""
    samples, problems, tar = {}, [], None
    current, fields, name = None, {}, None  # the sample being read, its fields, the last member
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    continue
                key, field = sample_key(member.name)
                where = f"{shard}:{member.name}"
                if key is None:
                    problems.append(f"{where}: no KEY.EXT name, so it belongs to no sample")
                    continue
                if member.offset_data + member.size > size:
                    problems.append(f"{where}: cut off (the shard ends at byte {size})")
                    break
                field = field.lower()
                if key != current:
                    current, fields = key, {}
                    if key in samples:  # WebDataset's readers make two samples of one key
                        first, offset = samples[key]["first"]
                        problems.append(f"{shard}: key {key!r} again at member {member.name} "
                                        f"(byte {member.offset}) after other keys; its first "
                                        f"member is {first} (byte {offset})")
                        continue
                    samples[key] = {"image": None, "first": (member.name, member.offset)}
                if field in fields:
                    problems.append(f"{shard}: key {key!r} has .{field} twice: members "
                                    f"{fields[field][0]} (byte {fields[field][1]}) and "
                                    f"{member.name} (byte {member.offset})")
                    continue
                fields[field] = (member.name, member.offset)
                sample = samples[key]
                if field in TAR_IMAGE_FIELDS:
                    if sample["image"] is None:
                        sample["image"] = (member.name, member.offset_data, member.size)
                elif field in TAR_LABEL_FIELDS:
                    try:
                        sample[field] = tar_label(field, tar.extractfile(member).read())
                    except ValueError as e:
                        problems.append(f"{where}: {e}")
            else:
                problem = tar_end_problem(shard, tar.offset, size, name)
                if problem:
                    problems.append(problem)
    except (tarfile.TarError, OSError) as e:
        if tar is None:  # the first header (tarfile names what is wrong with it)
            problems.append(f"{shard}: not a readable tar file (byte 0: {e})")
        elif tar.offset > size:  # the padding of the last member's data is cut off
            problems.append(f"{shard}: cut off after member {name} (the shard ends at byte "
                            f"{size}, its next header was due at byte {tar.offset})")
        else:
            problems.append(f"{shard}: damaged header at byte {tar.offset} ({e})")
    if problems:
        raise DataError("\n  ".join(first_problems(problems, f" in {shard}")))
    members = [s["image"][0] if s["image"] else key for key, s in samples.items()]
    # .cls first, as WebDataset's own readers take it, then the label of .json, then .txt
    values = [next((s[f] for f in TAR_LABEL_FIELDS if s.get(f, NO_LABEL) != NO_LABEL),
                   NO_LABEL) for s in samples.values()]
    return {"members": as_bytes(members),
            "offsets": np.array([s["image"][1] if s["image"] else NO_IMAGE
                                 for s in samples.values()], dtype=np.int64),
            "sizes": np.array([s["image"][2] if s["image"] else 0 for s in samples.values()],
                              dtype=np.int64),
            "labels": np.array([v if isinstance(v, int) else NO_LABEL for v in values],
                               dtype=np.int64),
            # a class name where the label is one (mapped by read_records), else empty
            "names": as_bytes([v if isinstance(v, str) else "" for v in values])}


def tar_end_problem(shard, offset, size, last):
    """Why the end tarfile found at `offset` is not the archive's end, or None. An end is two
    zero blocks with only zeros after them (the writer's padding); tarfile also stops, without
    an error, at a header it cannot read, where a shard is cut short, and at a zero block in the
    middle."""
    after = f" after member {last}" if last else ""
    with open(shard, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
        if not block:
            return (f"{shard}: cut off{after}: it ends at byte {size} without the end-of-archive "
                    "blocks (two zero blocks)")
        if len(block) < tarfile.BLOCKSIZE and block.strip(b"\0"):
            return f"{shard}: cut off inside the header at byte {offset} (it ends at byte {size})"
        if block.strip(b"\0"):
            return (f"{shard}: damaged header at byte {offset} ({header_problem(block)}); the "
                    "members from there on cannot be read")
        position = offset + len(block)
        while True:  # only zeros to the end: what follows is a writer's padding
            chunk = f.read(1 << 16)
            if not chunk:
                break
            rest = chunk.lstrip(b"\0")
            if rest:
                at = position + len(chunk) - len(rest)
                at -= at % tarfile.BLOCKSIZE
                return (f"{shard}: a zero block at byte {offset} (read as the end of the archive)"
                        f" but data again at byte {at}: a damaged header or a zero block in the "
                        "middle; the members after it cannot be read")
            position += len(chunk)
    if size - offset < 2 * tarfile.BLOCKSIZE:
        return (f"{shard}: cut off{after}: it ends at byte {size} inside the end-of-archive "
                f"blocks that start at byte {offset}")
    return None


def header_problem(block):
    """What tarfile finds wrong with a header block (a bad checksum, a field that is no number)."""
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return str(e)
    return "a header tarfile does not read"


def tar_label(field, data):
    """The label of a .cls or .txt member (its text) or of a .json member (its "label"): a class
    index (an integer, or its digits as text), or a class name (other text); NO_LABEL for a
    .json without "label"."""
    text = data.decode("utf-8", errors="replace").strip()
    if field != "json":
        value = text
        if not value:
            raise ValueError(f"an empty .{field}: expected a class index or a class name")
    else:
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON ({e.msg})") from None
        if not isinstance(item, dict) or "label" not in item:
            return NO_LABEL
        value = item["label"]
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        value = int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()  # a class name
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field 'label': expected an integer or a class name, got {value!r}")
    return value
