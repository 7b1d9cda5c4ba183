"""Generation's data files: JSON or JSONL records in three formats, read and checked into
conversations of turns.

  {"conversations": [{role, type: text|image, content|image_path}]}
  {"text_prompt", "image_path"}   text -> image: a user turn, then the assistant's image
  {"image_path", "caption"}       image -> text: a user turn, then the assistant's text
"""
import os
from dataclasses import dataclass

from dataset import DataError, check_split_field, json_items, parse_spec, raise_data_errors

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    role: str
    kind: str  # "text" or "image"
    value: str  # the text, or the image's absolute path


@dataclass
class Conversation:
    turns: list
    source: str  # file:line, for error messages


def _turns(item, folder):
    """The turns of one record in any of the three formats, or an error message."""
    def image(path, field):
        if not isinstance(path, str) or not path:
            raise ValueError(f"field '{field}': expected a non-empty string, got {path!r}")
        full = os.path.join(folder, path)
        if not os.path.isfile(full):
            raise ValueError(f"field '{field}': image file not found: {full}")
        return full

    def text(value, field):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field '{field}': expected a non-empty string, got {value!r}")
        return value

    formats = [f for f in ("conversations", "text_prompt", "caption") if f in item]
    if len(formats) > 1:  # one would be read and the other dropped
        raise ValueError(f"fields {', '.join(repr(f) for f in formats)}: a record is one of the "
                         "formats; write each direction as a record of its own")
    if "conversations" in item:
        turns = item["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("field 'conversations': expected a non-empty list of turns")
        out = []
        for i, turn in enumerate(turns):
            field = f"conversations[{i}]"
            if not isinstance(turn, dict):
                raise ValueError(  # noqa: TRY004 - collected with the other record errors
                    f"field '{field}': expected an object, got {type(turn).__name__}")
            role, kind = turn.get("role"), turn.get("type", "text")
            if role not in ROLES:
                raise ValueError(
                    f"field '{field}.role': expected one of {', '.join(ROLES)}, got {role!r}")
            if kind == "text":
                out.append(Turn(role, "text", text(turn.get("content"), f"{field}.content")))
            elif kind == "image":
                out.append(Turn(role, "image", image(turn.get("image_path"),
                                                     f"{field}.image_path")))
            else:
                raise ValueError(f"field '{field}.type': expected text or image, got {kind!r}")
        if not any(t.role == "assistant" for t in out):
            raise ValueError("field 'conversations': no assistant turn, so nothing to learn")
        return out
    if "text_prompt" in item:
        return [Turn("user", "text", text(item["text_prompt"], "text_prompt")),
                Turn("assistant", "image", image(item.get("image_path"), "image_path"))]
    if "caption" in item:
        return [Turn("user", "image", image(item.get("image_path"), "image_path")),
                Turn("assistant", "text", text(item["caption"], "caption"))]
    raise ValueError(
        "expected 'conversations', 'text_prompt' + 'image_path', or 'image_path' + 'caption'")


def read_generation_files(specs, training=False):
    """Read and check every record of every JSON / JSONL file (data.jsonl.json_items); raise one
    DataError listing what is wrong. In training data a record whose "split" names the
    validation or test set is wrong (data.jsonl.check_split_field): every record is trained on."""
    conversations, errors = [], []
    for text in specs:
        spec = parse_spec(text)
        if spec.kind != "jsonl":
            raise DataError(f"data spec {text!r}: --task generate reads JSON / JSONL records "
                            "(conversations, text_prompt + image_path, image_path + caption); "
                            f"a {spec.kind} source holds labelled images (--task classify, "
                            "autoencoder)")
        folder = os.path.dirname(os.path.abspath(spec.path))
        for _, where, item in json_items(spec.path, errors):
            try:
                check_split_field(item, training)
                conversations.append(Conversation(_turns(item, folder), where))
            except ValueError as e:
                errors.append(f"{where}: {e}")
    raise_data_errors(errors, len(conversations), specs)
    return conversations
