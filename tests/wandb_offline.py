"""Read an offline wandb run back: its ``.wandb`` datastore and its ``files/media`` folder.

The datastore is a LevelDB-style log (what wandb's own ``datastore.py`` wrote and read before wandb-core):
a 7-byte file header ``:W&B``, magic 0xBEE1, version 0; then 32 KiB blocks of records, each with a 7-byte
header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); the payloads are protobuf ``Record``s
(``wandb.proto.wandb_internal_pb2``). Only what the tests need: run records and history rows.
"""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb datastore"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the writer pads a block's tail that cannot hold a record header
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk = data[pos:pos + length]
        pos += length
        if len(chunk) < length:  # a record still being written: what is complete so far
            return
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: a record fails its checksum"
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _records(store: Path, timeout: float):
    """The run's records, once its ``exit`` record is written: ``run.finish()`` can return before the
    wandb-core service has flushed the datastore."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in raw_records(store):
            rec = pb.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{store} has no exit record after {timeout} s: the run never finished")
        time.sleep(0.1)


def read_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """``{"run": {project, group, name, job_type, id}, "history": [{"_step": n, key: value, ...}]}``."""
    (store,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {"run": None, "history": []}
    for rec in _records(store, timeout):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"project": r.project, "group": r.run_group, "name": r.display_name,
                          "job_type": r.job_type, "id": r.run_id}
        elif kind == "history":
            row = {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json)
                   for i in rec.history.item}
            out["history"].append(row)
    return out


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The offline run folders under ``wandb_dir`` (wandb puts them in ``wandb_dir/wandb/``)."""
    return sorted(Path(wandb_dir).rglob("offline-run-*"))


def scalars(history: list, prefix: str = "memtrack/") -> dict:
    """``{(step, key): value}`` of the numeric history values under ``prefix``."""
    return {(row["_step"], k): v for row in history for k, v in row.items()
            if k.startswith(prefix) and isinstance(v, (int, float)) and "/" not in k[len(prefix):]}


def images(run_dir: Path, history: list, key: str) -> dict:
    """``{step: [PNG path, ...]}`` of an image list logged under ``key``."""
    return {row["_step"]: [Path(run_dir) / "files" / f for f in row[f"{key}/filenames"]]
            for row in history if f"{key}/filenames" in row}
