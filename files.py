"""How every script writes its outputs, so that a kill or a full disk never loses what was there.

- A file (predictions, per-class JSON, run_summary.json, plots, PNG grids) is written whole under
  `.tmp-NAME` beside it and renamed to NAME: a reader sees the old file or the new one, never a
  torn one. A leftover `.tmp-NAME` of a killed run is overwritten by the next write.
- A JSONL log (eval_results.jsonl) gets whole lines appended, after a newline where a kill left
  its last line torn, so a torn line never swallows the next record (readers skip torn lines).
- A folder (an export) is written under `.tmp-NAME` and swapped in: the old one is renamed to
  `.old-NAME`, the new one to NAME, then the old one is deleted. Killed between two renames,
  `recover_folder` on the next run puts the old one back or finishes the swap.
- An OSError on a user-given output path (a folder where a file goes, a full disk) is an
  OutputError: a user error whose one-line message names the path.
"""
import os
import shutil

from faults import injected_fault

# a run folder's records: train.py's log and summary, eval.py's results of its checkpoints
METRICS_FILE, SUMMARY_FILE, RESULTS_FILE = "metrics.jsonl", "run_summary.json", "eval_results.jsonl"


class OutputError(ValueError):
    """An output path cannot be written; the message (one line) names the path and the reason."""


def reason(e):
    """One line for an OSError, or for torch.distributed.checkpoint's CheckpointException (whose
    text holds every rank's traceback): the underlying OS error and its file where there is one."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:  # CheckpointException: {rank: (exception, tb)}
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return reason(inner)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def temporary(path, kind="tmp"):
    """The hidden sibling of `path` a write goes to first (.tmp-NAME), or a replaced folder is
    renamed to (.old-NAME)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{kind}-{name}")


def check_file_path(path, what=None):
    """Refuse an output file path that names a folder, before any work is done."""
    if os.path.isdir(path):
        raise OutputError(f"{label(path, what)}: is a folder; give a file name")


def label(path, what):
    return f"{what} {path}" if what else str(path)


def not_written(path, what, e):
    kept = "it is left as it was" if os.path.exists(path) else "nothing was written"
    return f"cannot write {label(path, what)} ({reason(e)}); {kept}"


def write_file(path, write, what=None):
    """write(tmp_path) writes the whole file; it is synced and renamed to `path`. The old file
    stays as it was until the rename; on an error the temporary file is removed."""
    path = os.fspath(path)
    check_file_path(path, what)
    tmp = temporary(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        sync(tmp)
        injected_fault("kill_before_rename", 1)
        os.replace(tmp, path)
    except OSError as e:
        remove(tmp)
        raise OutputError(not_written(path, what, e)) from None
    return path


def write_text(path, text, what=None):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write_file(path, write, what)


def write_json(path, obj, what=None):
    import json
    return write_text(path, json.dumps(obj, indent=2), what)


class FileWriter:
    """A file written a piece at a time under .tmp-NAME and renamed to NAME by publish(): until
    then the file at `path` is the old one, whatever happens to this process."""

    def __init__(self, path, what=None):
        self.path, self.what, self.tmp = os.fspath(path), what, temporary(path)
        check_file_path(self.path, what)
        self.file = None
        self._do(lambda: os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True))
        self.file = self._do(lambda: open(self.tmp, "w", encoding="utf-8"))

    def _do(self, fn):
        try:
            return fn()
        except OSError as e:
            self.discard()
            raise OutputError(not_written(self.path, self.what, e)) from None

    def write(self, text):
        """Append `text` and flush it: a full disk is known here, not at publish()."""
        def write():
            self.file.write(text)
            self.file.flush()
        self._do(write)

    def publish(self):
        def done():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            injected_fault("kill_before_rename", 1)
            os.replace(self.tmp, self.path)
        self._do(done)

    def discard(self):
        if self.file is not None and not self.file.closed:
            self.file.close()
        remove(self.tmp)


def append_line(path, line, what=None):
    """Append one line (without its newline) to a JSONL log in one write, after a newline if the
    file's last line is torn."""
    try:
        with open(path, "a+b") as f:  # writes go to the end whatever the position
            torn = False
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                torn = f.read(1) != b"\n"
            f.write((b"\n" if torn else b"") + line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot append to {label(path, what)} ({reason(e)})") from None


def read_jsonl_records(path):
    """The JSON objects of a JSONL file; a line that does not parse (torn by a kill) is skipped."""
    import json
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def recover_folder(path):
    """Finish or undo a folder swap that a kill interrupted: the old folder comes back if the new
    one was not renamed in yet, is deleted if it was; a half-written new one is deleted. Returns
    what was done (for a note), or None."""
    old, tmp, done = temporary(path, "old"), temporary(path), None
    if os.path.isdir(old):
        if os.path.exists(path):
            shutil.rmtree(old)
            done = f"removed {old}, left by an interrupted replacement of {path}"
        else:
            os.rename(old, path)
            done = f"restored {path} from {old}, left by an interrupted replacement"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
        done = (done + "; " if done else "") + f"removed the partial {tmp}"
    return done


def swap_in(tmp, path):
    """Rename the complete folder `tmp` to `path`; an existing `path` is renamed aside first and
    deleted last, so at every point one of them is whole (recover_folder finds it)."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = temporary(path, "old")
    if os.path.isdir(old):
        shutil.rmtree(old)
    os.rename(path, old)
    injected_fault("kill_in_swap", 1)
    os.rename(tmp, path)
    injected_fault("kill_in_swap", 2)
    shutil.rmtree(old)


def sync(path):
    """Flush a written file to the disk, so the rename never publishes a file the disk lacks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass
