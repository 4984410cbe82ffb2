#!/usr/bin/env python3
"""Writes the images of a TensorBoard run to PNG files, read with TensorBoard's EventAccumulator.

Usage: export_tb_images.py RUN_DIR OUT_DIR [TAG]     (TAG defaults to "reconstructions")
Files: OUT_DIR/<tag>-step<step>.png. Needs TensorBoard (e.g. .venv/bin/python from scripts/test.sh).
"""
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    run_dir, out_dir = sys.argv[1], sys.argv[2]
    tag = sys.argv[3] if len(sys.argv) == 4 else "reconstructions"
    acc = EventAccumulator(run_dir, size_guidance={"images": 0})
    acc.Reload()
    if tag not in acc.Tags()["images"]:
        sys.exit(f"{run_dir}: no images tagged {tag!r} (found: {acc.Tags()['images']})")
    os.makedirs(out_dir, exist_ok=True)
    for im in acc.Images(tag):
        path = os.path.join(out_dir, f"{tag.replace('/', '_')}-step{im.step}.png")
        with open(path, "wb") as f:
            f.write(im.encoded_image_string)
        print(path)


if __name__ == "__main__":
    main()
