"""The loaders: a DataLoader over records read by index (ImageDataset, EpochSampler: keys carry
their epoch, so persistent workers serve every epoch and resume is exact), or over the training
stream (make_stream_loader); the fast image path (FastPixels), the batches (Collate) and the
workers' options and count."""
import math
import os
import uuid
import weakref

import torch

import host_allocator
from augment import decode_augmented, sample_rng
from data.stream import import_streaming
from data.types import DataError
from preprocess import Pixels, composites_alpha, decode_pixels, decode_rgb


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one image: a PIL RGB image for the processor path (preprocessing happens per batch
    in `collate`), or with `pixels` (a FastPixels) a preprocess.Pixels, already resized and
    augmented, which Collate writes into its batch.

    A key is an index, or (index, epoch[, repeat]) from EpochSampler: the fast path seeds a
    sample's augmentation with it. An image that fails to decode is an error naming it, or with
    skip_bad_images an item whose image is None and whose label is that message (the batch
    drops and reports it)."""

    def __init__(self, records, skip_bad_images=False, pixels=None, alpha_on_white=False):
        self.records, self.skip_bad_images, self.pixels = records, skip_bad_images, pixels
        self.alpha_on_white = alpha_on_white  # the processor's do_convert_rgb (processor path)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, epoch, repeat = (key, 0, 0) if not isinstance(key, tuple) else (*key, 0)[:3]
        records = self.records
        dataset_id = int(records.dataset_ids[index])
        try:
            image_file = records.open(index)  # a path, or the bytes of a shard's member
            if self.pixels is not None:
                image = self.pixels(image_file, dataset_id, index, epoch, repeat)
            else:
                image = decode_rgb(image_file, self.alpha_on_white)
        except Exception as e:
            r = records[index]  # its names, for the message only
            named = "" if r.image_path == r.source else f" {r.image_path}"
            message = f"{r.source}: cannot decode image{named}: {e}"
            if self.skip_bad_images:
                return None, message, dataset_id, index
            raise DataError(message) from None
        return image, int(records.labels[index]), dataset_id, index


class FastPixels:
    """The fast image path of one loader: file -> preprocess.Pixels (preprocess.py,
    augment.py)."""

    def __init__(self, recipe, augment=None, draft=True):
        self.recipe, self.augment, self.draft = recipe, augment, draft

    def __call__(self, path, dataset_id, index, epoch, repeat):
        if self.augment is None or self.augment.modes[dataset_id] == "none":
            return decode_pixels(path, self.recipe, self.draft)
        rng = sample_rng(self.augment.seed, epoch, index, repeat)
        return decode_augmented(path, self.recipe, self.augment, dataset_id, rng, self.draft)


def batch_tensor(shape, dtype):
    """An empty batch tensor; in a DataLoader worker, in shared memory (as torch's
    default_collate allocates): sending it to the main process then passes a handle, where a
    batch in private memory is first copied into shared memory whole."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return shared_tensor(shape, dtype)


def shared_tensor(shape, dtype):
    """An empty tensor in shared memory (its pages are taken as they are first written)."""
    empty = torch.empty(0, dtype=dtype)
    storage = empty._typed_storage()._new_shared(math.prod(shape), device=empty.device)
    return empty.new(storage).view(shape)


RINGS = weakref.WeakValueDictionary()  # token -> SharedBatches, in the process that made them


class SharedBatches:
    """Pixel batches in shared memory, made before the workers start and used again: a worker
    writes a batch into a free slot of its own and sends the slot's number (a SlotRef), not a new
    tensor, whose shared memory would be created, faulted in and its file descriptor passed at
    every batch (docs/performance.md). In the main process the number becomes a tensor over the
    slot (as it is unpickled), and the slot is free again only once that tensor and every view of
    it are gone: the tensor is made from an array of its own whose finaliser frees the slot. A
    batch dropped unread frees its slot the same way. A worker with no free slot (its batches
    all held), or a batch of another size, gets a new shared batch as before."""

    def __init__(self, workers, slots, shape):
        self.shape = tuple(shape)  # (batch size, 3, H, W)
        self.pixels = shared_tensor((workers, slots, *self.shape), torch.uint8)
        self.busy = shared_tensor((workers, slots), torch.int32)  # 1: taken, not freed yet
        self.busy.zero_()
        self.token = uuid.uuid4().hex  # how a SlotRef finds this ring in the main process
        self.next_slot = 0  # where a worker looks first (each worker has its own copy)
        RINGS[self.token] = self

    def take(self, count, size):
        """In a worker: (pixels, SlotRef) of a free slot of its own for `count` images of `size`
        (height, width), marked taken; None where none is free or the batch does not fit."""
        info = torch.utils.data.get_worker_info()
        if info is None or count > self.shape[0] or tuple(size) != self.shape[2:]:
            return None
        busy = self.busy[info.id].numpy()
        for k in range(len(busy)):
            slot = (self.next_slot + k) % len(busy)
            if not busy[slot]:
                busy[slot], self.next_slot = 1, slot + 1
                return self.pixels[info.id, slot, :count], SlotRef(self.token, info.id, slot,
                                                                   count)
        return None

    def receive(self, worker, slot, count):
        """In the main process: the batch in a slot, as a tensor that frees the slot when it and
        its views are gone (torch.from_numpy keeps its array alive until then)."""
        array = self.pixels[worker, slot, :count].numpy()  # a new array, this batch's own
        weakref.finalize(array, free_slot, self.busy, worker, slot)
        return torch.from_numpy(array)


def free_slot(busy, worker, slot):
    busy[worker, slot] = 0


def receive_slot(token, worker, slot, count):
    """A SlotRef unpickled in the main process: its batch's tensor."""
    ring = RINGS.get(token)
    if ring is None:
        raise RuntimeError("a batch arrived after its loader was deleted")
    return ring.receive(worker, slot, count)


class SlotRef:
    """A batch written into slot `slot` of worker `worker` of a SharedBatches, as sent."""
    __slots__ = ("token", "worker", "slot", "count")

    def __init__(self, token, worker, slot, count):
        self.token, self.worker, self.slot, self.count = token, worker, slot, count

    def __reduce__(self):
        return receive_slot, (self.token, self.worker, self.slot, self.count)


class SentByValue:
    """A batch's small tensor (labels, dataset ids, indices) as a worker sends it: pickled with the
    batch, a tensor again once unpickled in the main process. Sent as a tensor, torch would move
    it into shared memory of its own and pass its file descriptor, which costs more than the
    bytes (docs/performance.md)."""
    __slots__ = ("array",)

    def __init__(self, tensor):
        self.array = tensor.numpy()

    def __reduce__(self):
        return torch.from_numpy, (self.array,)


class Collate:
    """Turns (image, label, dataset_id, index) items into a batch.

    `inputs` (model.ImageInputs / ImageTextInputs) builds the backbone's forward arguments from
    the images and their dataset names (a vision-language prompt may name the dataset); the fast
    path's preprocess.Pixels are written each straight into its slot of pixel_values, a
    contiguous (B, 3, H, W) uint8 tensor (in shared memory in a worker), instead.
    """

    def __init__(self, inputs, dataset_names, shared=None):
        self.inputs, self.dataset_names, self.shared = inputs, dataset_names, shared

    def __call__(self, items):
        skipped = [(message, dataset_id) for image, message, dataset_id, _ in items
                   if image is None]
        items = [item for item in items if item[0] is not None]
        if not items:
            raise DataError(f"no image of a batch could be decoded, e.g. {skipped[0][0]}")
        images, labels, dataset_ids, indices = zip(*items)
        if isinstance(images[0], Pixels):
            taken = self.shared and self.shared.take(len(images), images[0].size)
            pixels = taken[0] if taken else batch_tensor((len(images), 3, *images[0].size),
                                                         torch.uint8)
            for image, slot in zip(images, pixels.numpy()):
                image.write(slot)
            batch = {"pixel_values": taken[1] if taken else pixels}
        else:
            batch = self.inputs(list(images), [self.dataset_names[i] for i in dataset_ids])
        small = {"labels": labels, "dataset_ids": dataset_ids, "indices": indices}
        by_value = torch.utils.data.get_worker_info() is not None
        for key, values in small.items():
            batch[key] = SentByValue(torch.tensor(values)) if by_value else torch.tensor(values)
        return {**batch, "skipped": skipped} if skipped else batch


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) keys; `set(indices, epoch)` re-aims a loader with persistent workers
    (workers hold no per-epoch state: the epoch travels with each key)."""

    def __init__(self, indices, epoch=0):
        self.set(indices, epoch)

    def set(self, indices, epoch):
        self.indices, self.epoch = list(indices), int(epoch)

    def __iter__(self):
        return iter([(int(i), self.epoch) for i in self.indices])

    def __len__(self):
        return len(self.indices)


PREFETCH_FACTOR = 4  # batches each worker prepares ahead (--prefetch_factor)


def worker_options(num_workers, persistent=False, prefetch_factor=None):
    """DataLoader keywords of the worker processes. Each iterator draws its workers' base seed
    from the loader's own generator, not the global RNG: building or iterating a loader (once per
    run with persistent workers, or per epoch; evaluation's, from the cache or not) leaves the
    training's random stream as it was, so a resumed run draws what an uninterrupted one does."""
    options = {"generator": torch.Generator().manual_seed(0)}
    if num_workers:
        options.update(persistent_workers=persistent,
                       prefetch_factor=prefetch_factor or PREFETCH_FACTOR)
    return options


def make_loader(records, indices, inputs, dataset_names, *, batch_size, num_workers,
                pin_memory=False, skip_bad_images=False, fast_path=False, augment=None, epoch=0,
                draft=None, persistent_workers=False, prefetch_factor=None):
    """The DataLoader of a classification run: batches of the backbone's inputs + labels,
    dataset_ids, indices (and "skipped" with skip_bad_images).

    fast_path: vision backbones whose processor has a preprocess.pixel_recipe (inputs.recipe)
    get uint8 pixel_values, which MaskedClassifier(..., inputs=inputs) (inputs.pixel_normalize)
    normalises on the device; other inputs keep the processor path. augment: an
    augment.AugmentConfig for training (None: the processor's deterministic resize/crop, as
    for evaluation); epoch seeds its draws. draft: let JPEGs decode at reduced scale
    (preprocess.py states the difference); default: with augmentation only, so evaluation
    equals the processor's output within float rounding. persistent_workers keeps the workers for
    the next `iter()`; re-aim the same loader with `loader.sampler.set(indices, epoch)` (the
    workers hold no state of an epoch: exact resume is unchanged).
    """
    pixels = pixel_path(inputs, fast_path, augment, draft)
    # a worker holds at most prefetch_factor batches unread; two more slots for those in use
    shared = (SharedBatches(num_workers, (prefetch_factor or PREFETCH_FACTOR) + 2,
                            (batch_size, 3, *pixels.recipe.output_size))
              if pixels is not None and num_workers else None)
    return torch.utils.data.DataLoader(
        ImageDataset(records, skip_bad_images, pixels,
                     composites_alpha(getattr(inputs, "image_processor", None))),
        batch_size=batch_size,
        sampler=EpochSampler(indices, epoch), collate_fn=Collate(inputs, dataset_names, shared),
        num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=start_worker,
        **worker_options(num_workers, persistent_workers, prefetch_factor))


def make_stream_loader(stream, inputs, dataset_names, *, batch_size, num_workers, pin_memory,
                       persistent_workers=False, prefetch_factor=None):
    """torchdata's StatefulDataLoader over an ImageStream: state_dict() is the position after the
    last batch taken, JSON-able; load_state_dict() before the first batch resumes there."""
    _, StatefulDataLoader = import_streaming()
    stream.alpha_on_white = composites_alpha(getattr(inputs, "image_processor", None))
    return StatefulDataLoader(stream, batch_size=batch_size,
                              collate_fn=Collate(inputs, dataset_names), num_workers=num_workers,
                              pin_memory=pin_memory, worker_init_fn=start_worker,
                              **worker_options(num_workers, persistent_workers, prefetch_factor))


def pixel_path(inputs, fast_path, augment=None, draft=None):
    """The FastPixels of a loader (make_loader states the options), or None for the processor
    path."""
    recipe = getattr(inputs, "recipe", None) if fast_path else None
    if augment is not None and recipe is None:
        raise ValueError(f"augmentation needs the fast image path; {type(inputs).__name__} has "
                         "none (see augment.augment_config)")
    draft = augment is not None if draft is None else draft
    return FastPixels(recipe, augment, draft) if recipe is not None else None


def auto_num_workers(cap=16):
    """DataLoader workers per rank for --num_workers auto: the CPUs this process may use
    (os.sched_getaffinity) divided among the local processes (LOCAL_WORLD_SIZE), one left for
    the process itself, at most `cap`, at least 0."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(cap, usable_cpus() // local - 1))


def usable_cpus():
    """The CPUs this process may use (os.sched_getaffinity; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def start_worker(_worker_id):
    """A DataLoader worker's start: it leaves SIGTERM / SIGUSR1 to the training process, which
    stops its workers itself, and keeps the memory a batch frees for the next batch
    (host_allocator.keep_freed_memory), whatever its parent set: a process sharding weights in
    host memory maps its blocks over 1 MB, and a worker with glibc's defaults took 1,200-2,200
    page faults a batch of 32 augmented JPEGs, against about 200 (docs/performance.md)."""
    import signal
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    host_allocator.keep_freed_memory()
