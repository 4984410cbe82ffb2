#!/usr/bin/env python3
"""Counts subnormal floats (nonzero, |x| < 1.18e-38) in each tensor of a frugal checkpoint.

x86 cores take a slow path for every subnormal operand, so a model whose weights drift into that
range trains several times slower (README, "What the network can do with every label"). Standard
library only: reads the checkpoint container (src/checkpoint.rs) and the MessagePack records burn
writes into it.

    scripts/subnormals.py checkpoints/ceiling/finetuned-all-labels-s2/checkpoint.bin
"""
import argparse
import struct
import sys
from array import array
from pathlib import Path

SMALLEST_NORMAL = 1.1754943508222875e-38


def decode(b: bytes, i: int):
    """One MessagePack value at b[i:]; returns (value, next index)."""
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if t >= 0xE0:
        return t - 256, i
    if 0x80 <= t <= 0x8F:
        return decode_map(b, i, t & 0x0F)
    if 0x90 <= t <= 0x9F:
        return decode_array(b, i, t & 0x0F)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return b[i : i + n].decode("utf8", "replace"), i + n
    if t in (0xC0, 0xC2, 0xC3):
        return {0xC0: None, 0xC2: False, 0xC3: True}[t], i
    sized = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
    if t in sized:
        w = sized[t]
        n = int.from_bytes(b[i : i + w], "big")
        i += w
        raw = b[i : i + n]
        return (bytes(raw) if t <= 0xC6 else raw.decode("utf8", "replace")), i + n
    if t == 0xCA:
        return struct.unpack(">f", b[i : i + 4])[0], i + 4
    if t == 0xCB:
        return struct.unpack(">d", b[i : i + 8])[0], i + 8
    ints = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    if t in ints:
        w = ints[t]
        return int.from_bytes(b[i : i + w], "big", signed=t >= 0xD0), i + w
    if t in (0xDC, 0xDD, 0xDE, 0xDF):
        w = 2 if t in (0xDC, 0xDE) else 4
        n = int.from_bytes(b[i : i + w], "big")
        return (decode_array if t <= 0xDD else decode_map)(b, i + w, n)
    raise ValueError(f"unsupported MessagePack type 0x{t:02x} at byte {i - 1}")


def decode_map(b, i, n):
    out = {}
    for _ in range(n):
        k, i = decode(b, i)
        out[k], i = decode(b, i)
    return out, i


def decode_array(b, i, n):
    out = []
    for _ in range(n):
        v, i = decode(b, i)
        out.append(v)
    return out, i


def blobs(path: Path):
    """(name, bytes) of each section of a frugal checkpoint container."""
    data = path.read_bytes()
    if data[:8] != b"FRUGALCK":
        sys.exit(f"error: {path} is not a frugal checkpoint")
    body = data[:-4]
    pos = 12
    header_len = int.from_bytes(body[pos : pos + 8], "little")
    pos += 8 + header_len
    count = int.from_bytes(body[pos : pos + 4], "little")
    pos += 4
    for _ in range(count):
        n = int.from_bytes(body[pos : pos + 4], "little")
        name = body[pos + 4 : pos + 4 + n].decode()
        pos += 4 + n
        size = int.from_bytes(body[pos : pos + 8], "little")
        pos += 8
        yield name, body[pos : pos + size]
        pos += size


def tensors(node, path):
    """(path, float32 values) of every f32 tensor in a decoded record."""
    if isinstance(node, dict):
        if "bytes" in node and "dtype" in node:
            if "F32" in str(node["dtype"]):
                raw = node["bytes"]
                values = array("f")
                values.frombytes(bytes(raw) if isinstance(raw, list) else raw)
                if sys.byteorder != "little":
                    values.byteswap()
                yield path, values
            return
        for k, v in node.items():
            yield from tensors(v, f"{path}/{k}")
    elif isinstance(node, list):
        for j, v in enumerate(node):
            yield from tensors(v, f"{path}[{j}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a checkpoint.bin")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"error: {args.checkpoint} does not exist")
    try:
        rows = [
            (path, values)
            for name, blob in blobs(args.checkpoint)
            # an empty section, or one that is not a burn record, is skipped
            if blob and blob[0] >= 0x80
            for path, values in tensors(decode(blob, 0)[0], name)
        ]
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        sys.exit(f"error: {args.checkpoint} is truncated or corrupt ({e})")
    total = total_sub = 0
    print(f"{'tensor':<72} {'values':>10} {'subnormal':>10} {'share':>7}")
    for path, values in rows:
        sub = sum(1 for x in values if x != 0.0 and -SMALLEST_NORMAL < x < SMALLEST_NORMAL)
        total += len(values)
        total_sub += sub
        print(f"{path:<72} {len(values):>10} {sub:>10} {100 * sub / max(len(values), 1):>6.2f}%")
    print(f"{'all':<72} {total:>10} {total_sub:>10} {100 * total_sub / max(total, 1):>6.2f}%")


if __name__ == "__main__":
    main()
