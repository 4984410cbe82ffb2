#!/usr/bin/env python3
"""Reads a frugal run directory with TensorBoard's own code and prints what it found, as JSON.

Usage: check_tensorboard.py RUN_DIR

- scalars, images and histograms through TensorBoard's EventAccumulator (restart purging on);
- every projector_config.pbtxt under RUN_DIR through TensorBoard's ProjectorConfig proto, with
  the tensor file loaded by numpy, the metadata rows counted and the sprite's PNG size read.

The Rust tests (tests/tensorboard.rs) compare this with what frugal says it wrote.
"""
import json
import os
import struct
import sys

import numpy as np
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.projector import projector_config_pb2


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    return list(struct.unpack(">II", head[16:24]))


def events(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    return {
        "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [[e.step, e.width, e.height, png_size_bytes(e.encoded_image_string)]
                       for e in acc.Images(t)] for t in tags["images"]},
        "histograms": {t: [[e.step, e.histogram_value.num, e.histogram_value.min,
                            e.histogram_value.max, len(e.histogram_value.bucket)]
                           for e in acc.Histograms(t)] for t in tags["histograms"]},
    }


def png_size_bytes(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("image is not a PNG")
    return list(struct.unpack(">II", data[16:24]))


def projectors(run_dir):
    found = {}
    for root, _, files in os.walk(run_dir):
        if "projector_config.pbtxt" not in files:
            continue
        if not any("tfevents" in f for f in files):
            raise ValueError(f"{root}: projector config without an event file (TensorBoard would not list it)")
        config = projector_config_pb2.ProjectorConfig()
        with open(os.path.join(root, "projector_config.pbtxt")) as f:
            text_format.Parse(f.read(), config)
        for emb in config.embeddings:
            tensors = np.loadtxt(os.path.join(root, emb.tensor_path), delimiter="\t", ndmin=2)
            with open(os.path.join(root, emb.metadata_path)) as f:
                meta = f.read().splitlines()
            found[emb.tensor_name] = {
                "dir": os.path.relpath(root, run_dir),
                "tensor_shape": list(emb.tensor_shape),
                "tensors_loaded": list(tensors.shape),
                "tensors_finite": bool(np.isfinite(tensors).all()),
                "metadata_header": meta[0].split("\t"),
                "metadata_rows": len(meta) - 1,
                "sprite_size": png_size(os.path.join(root, emb.sprite.image_path)),
                "sprite_tile": list(emb.sprite.single_image_dim),
            }
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run_dir = sys.argv[1]
    out = events(run_dir)
    out["projectors"] = projectors(run_dir)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
