"""The WebDataset reader: NAME=PATH to .tar shards (a file, a folder of them, a glob, a
{000..099} range); sample KEY is KEY.jpg|jpeg|png|webp with KEY.cls, the `label` of KEY.json or
KEY.txt. Each shard's index (tar_index.py) gives every sample's image offset and label, so a
record is read by its byte offset, without unpacking the shard."""
import io
import os
from collections import OrderedDict

import numpy as np

from data.paths import URL_READ, is_url, spec_files
from data.tar_index import load_tar_index, no_image_member
from data.types import NO_IMAGE, DataError, Source, part

COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SHARD_FILES = (".tar",) + COMPRESSED_SHARDS


class TarShard(Source):
    """A WebDataset shard: member is the image member's name, offset and size its bytes in the
    shard (read_member)."""

    def where(self, row, member):
        return f"{self.path}:{member}"

    def open(self, row, member, offset, size):
        if offset == NO_IMAGE:
            raise DataError("the sample has no image member")
        data = read_member(self.path, offset, size)
        if len(data) != size:
            raise DataError(f"the shard ends inside member {member}")
        return io.BytesIO(data)

    def what(self):
        return "WebDataset shards"


OPEN_SHARDS = 64  # shards a process keeps open; a shuffled order over thousands stays under the
# open-file limit (the least recently read is closed)
_descriptors = OrderedDict()  # shard path -> descriptor, of process _owner[0]
_owner = [None]


def read_member(path, offset, size):
    """`size` bytes at `offset` of a shard, with pread on a descriptor this process keeps open (a
    DataLoader worker opens its own after it starts)."""
    if _owner[0] != os.getpid():  # a forked worker: the descriptors it inherited are its parent's
        for fd in _descriptors.values():
            os.close(fd)
        _descriptors.clear()
        _owner[0] = os.getpid()
    fd = _descriptors.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if len(_descriptors) >= OPEN_SHARDS:
            os.close(_descriptors.popitem(last=False)[1])
    _descriptors[path] = fd
    return os.pread(fd, size, offset)


def read_shards(spec, reading, jsonl_record):
    """Each shard's index (built once, then read from its cache) gives its samples' image
    offsets and labels; problems of every shard are collected before anything is raised."""
    if is_url(spec.path):
        raise DataError(f"data spec {spec.text!r}: {URL_READ}")
    shards = spec_files(spec, SHARD_FILES)
    dataset_id = reading.dataset_id(spec.name, f"data spec {spec.text!r}")
    skipped = []
    for shard in shards:
        if not shard.endswith(".tar"):
            raise DataError(f"data spec {spec.text!r}: {shard} is a compressed shard: shards "
                            "are read by the byte offset of each member, so they must be "
                            f"uncompressed .tar files: uncompress it (gunzip, bunzip2 or unxz "
                            "leave a .tar), or stream it with train.py --streaming")
        try:
            index = load_tar_index(shard, reading.index_dir)
        except DataError as e:
            reading.errors.append(str(e))
            continue
        source = TarShard(shard)
        source_id = reading.add_source(source)
        members = index["members"]
        missing = index["offsets"] == NO_IMAGE
        if missing.any():
            lost = [f"{shard}:{m.decode()}" for m in members[missing]]
            if reading.skip_missing_images:
                skipped += lost
            else:
                reading.errors += [no_image_member(w) for w in lost]
        keep = ~missing if reading.skip_missing_images else np.ones(len(members), dtype=bool)
        reading.parts.append(part(source_id, dataset_id, np.flatnonzero(keep),
                                  index["labels"][keep], members[keep], index["offsets"][keep],
                                  index["sizes"][keep]))
        if reading.labelled:
            kept = members[keep]
            reading.add_names(spec.name, index["names"][keep], shard,
                              lambda i, kept=kept, shard=shard: f"{shard}:{kept[i].decode()}")
    if skipped:
        reading.notes.append(f"{len(skipped)} sample(s) without an image left out "
                             f"(--on_bad_image skip): {', '.join(skipped[:5])}"
                             f"{', ...' if len(skipped) > 5 else ''}")
