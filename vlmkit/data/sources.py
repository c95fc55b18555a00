"""Where samples come from: `data.path` -> a list of records, an HF dataset, or (streaming) an ordered stream.

`data.path` is one of:
    a file            .json (a list of samples), .jsonl (one per line), .parquet, .arrow
    a folder          a `save_to_disk` folder (Dataset, or DatasetDict: its `train` split), or a folder of files of
                      one of the kinds above (its shards, read in sorted name order)
    a hub id          `hf:org/name[:split]`, or a bare `org/name[:split]` that is not a local path (split: train)
JSON / JSONL are read here (errors name the file and line); parquet and arrow through the `datasets` library
(never with remote code). Every error names the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


class DatasetError(ValueError):
    """A dataset file that cannot be used as a whole; the message names the file (and the line).
    `kind`: unreadable_dataset | empty_dataset (check-data's names)."""

    def __init__(self, message: str, kind: str = "unreadable_dataset"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return type(self), (str(self), self.kind)


# ---- what the path names ----------------------------------------------------------------------------
def resolve(path: str) -> tuple[str, object]:
    """(kind, what): ("hub", (name, split)), ("saved", folder) or ("files", [paths of one suffix, sorted])."""
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        return "hub", (name, split or "train")
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "saved", str(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES and not f.name.startswith("."))
        kinds = sorted({f.suffix for f in files})
        if not files:
            raise DatasetError(f"{path}: a folder with no dataset files ({', '.join(SUFFIXES)}) and not a "
                               f"save_to_disk folder (no state.json / dataset_dict.json)")
        if len(kinds) > 1:
            raise DatasetError(f"{path}: a folder of files of different kinds ({', '.join(kinds)}); keep one kind of "
                               f"shard per folder")
        return "files", [str(f) for f in files]
    if p.exists():
        return "files", [str(p)]
    if HUB_ID.match(path) and not path.endswith(SUFFIXES):
        name, _, split = path.partition(":")
        return "hub", (name, split or "train")
    raise FileNotFoundError(f"dataset file not found: {path}")


def default_image_folder(path: str) -> str:
    """Where relative image paths start when `data.image_folder` is not set: the folder `path` is in (for a folder,
    its parent, as before); none for a hub dataset."""
    if resolve(path)[0] == "hub":
        return ""
    return os.path.dirname(path.rstrip("/"))


# ---- map-style: every record, indexable ---------------------------------------------------------------
def load_records(path: str):
    """A list of samples (JSON / JSONL), or an HF `datasets.Dataset` (parquet, arrow, saved folders, hub ids)."""
    kind, what = resolve(path)
    if kind == "hub":
        return _hub(*what, streaming=False)
    if kind == "saved":
        return _saved(what)
    files = what
    suffix = Path(files[0]).suffix
    if suffix in (".parquet", ".arrow"):
        return _tables(files, suffix)
    out = []
    for f in files:
        out.extend(_json_records(f))
    return out


def _hub(name: str, split: str, streaming: bool):
    import datasets

    try:  # no trust_remote_code: dataset scripts never run
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - a hub id that is also a mistyped local path deserves both readings
        raise DatasetError(f"{name}: not a local file or folder, and loading it as a hub dataset (split {split}) "
                           f"failed: {type(e).__name__}: {e}") from None


def _saved(folder: str):
    import datasets

    try:
        ds = datasets.load_from_disk(folder)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"{folder}: a folder, but not a readable saved HF dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DatasetError(f"{folder}: a saved DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                               f"point data.path at the split's folder")
        return ds["train"]
    return ds


def _tables(files: list[str], suffix: str):
    """parquet / arrow shards -> one HF Dataset (arrow: memory-mapped in place; parquet: through the datasets
    cache). A shard that cannot be read is named."""
    import datasets

    parts = []
    for f in files:
        try:
            if suffix == ".arrow":
                parts.append(datasets.Dataset.from_file(f))
            else:
                parts.append(datasets.load_dataset("parquet", data_files=[f], split="train"))
        except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many kinds; the file is what matters
            raise DatasetError(f"{f}: cannot read as {suffix[1:]}: {type(e).__name__}: {e}") from None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _text(path: str, raw: bytes) -> str:
    """UTF-8 text (a leading byte-order mark allowed), or an error naming the file, line and byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {col} "
                           f"(save the file as UTF-8)") from None


def _json_error(path: str, e: json.JSONDecodeError, line: int | None = None) -> DatasetError:
    where = f"line {line}, column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
    hint = ""
    if line is None and e.msg == "Extra data" and e.lineno > 1:
        hint = " (one JSON object per line? name the file .jsonl)"
    return DatasetError(f"{path}: invalid JSON at {where}: {e.msg}{hint}")


def _json_records(path: str) -> list:
    """The samples of one .json (a list) or .jsonl file (another suffix: read as JSON)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file: {e.strerror or e}") from None
    if raw.startswith(b"PAR1") and p.suffix not in (".json", ".jsonl"):
        raise DatasetError(f"{path}: a parquet file: name it .parquet")
    text = _text(path, raw)
    if p.suffix == ".jsonl":
        return [_json_line(path, line, n) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def _json_line(path: str, line: str, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise _json_error(path, e, line=n) from None


# ---- streaming: records in order, never listed ----------------------------------------------------------
def iter_records(path: str, skip: int = 0):
    """The records of `path` in order, after the first `skip` (skipped without building them where the source
    allows: JSONL lines are not parsed, HF streams skip before decoding). Images of HF Image features come as
    {"bytes", "path"} dicts, decoded later by vlmkit with its pixel limits checked first."""
    kind, what = resolve(path)
    if kind == "files" and Path(what[0]).suffix in (".json", ".jsonl"):
        yield from _iter_json(what, skip)
        return
    if kind == "hub":
        ds = _hub(*what, streaming=True)
    elif kind == "saved":
        ds = _saved(what)
    else:
        ds = _stream_tables(what)
    ds = undecoded(ds)
    if skip:
        ds = ds.skip(skip)
    # .iter(): never the torch-worker sharding IterableDataset.__iter__ applies (vlmkit shards the stream itself)
    for batch in ds.iter(batch_size=64):
        cols = list(batch)
        for row in zip(*(batch[c] for c in cols)):
            yield dict(zip(cols, row))


def _iter_json(files: list[str], skip: int):
    for f in files:
        if Path(f).suffix != ".jsonl":  # a JSON list is parsed whole anyway
            recs = _json_records(f)
            take = recs[skip:]
            skip = max(0, skip - len(recs))
            yield from take
            continue
        try:
            with open(f, "rb") as fh:
                for n, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    if skip:
                        skip -= 1
                        continue
                    try:
                        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                    except UnicodeDecodeError:
                        raise DatasetError(f"{f}: not UTF-8 text at line {n} (save the file as UTF-8)") from None
                    yield _json_line(f, line, n)
        except OSError as e:
            raise DatasetError(f"{f}: cannot read the file: {e.strerror or e}") from None


def _stream_tables(files: list[str]):
    import datasets

    suffix = Path(files[0]).suffix
    if suffix == ".arrow":
        return _tables(files, suffix)  # memory-mapped: read in order without a copy
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{', '.join(files)}: cannot read as parquet: {type(e).__name__}: {e}") from None


def undecoded(ds):
    """`ds` with its Image features (single or in lists) left as {"bytes", "path"} dicts."""
    import datasets

    features = getattr(ds, "features", None) or {}
    for name, feat in features.items():
        inner = getattr(feat, "feature", None)
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image) and inner.decode:
            ds = ds.cast_column(name, type(feat)(datasets.Image(decode=False)))
    return ds
