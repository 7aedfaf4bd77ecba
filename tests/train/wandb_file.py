"""Read the records of an offline W&B run file (`run-<id>.wandb`) without a server.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log framing in
32 KiB blocks (each record: crc32 of type + payload, uint16 length, uint8 type FULL=1/FIRST=2/MIDDLE=3/LAST=4;
a block tail shorter than a record header is padding) around `wandb_internal_pb2.Record` protobufs.
"""
import json
import struct
import zlib

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_run(path):
    """{"id", "config": {key: value}, "history": [{key: value}], "summary": {key: value}} of one run file."""
    out = {"id": None, "config": {}, "history": [], "summary": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
    return out


def _items(items):
    """{key: value} of history/summary/config items (a key is either `key` or a one-element `nested_key`)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
