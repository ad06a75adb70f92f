"""Pack an image folder (``SRC/<identity>/<image>``) into an insightface rec pack (``train.rec/.idx``, ``property``).

    python scripts/pack_rec.py --src data/my_faces --dst data/my_faces_rec --workers 8
    python scripts/pack_rec.py --src raw/ --dst packed/ --landmarks raw/landmarks.txt --overwrite

``--landmarks`` names a text file with one ``relative/path x1 y1 ... x5 y5`` line per image (5 points:
eyes, nose tip, mouth corners, in pixels); every image is then aligned to the ArcFace template and
every image must be listed. Without it, images are resized to ``--size`` when their size differs.
Unreadable images are skipped and listed; identities left without images are dropped (labels stay
0..K-1 in sorted folder-name order). See ``facems.data.pack`` for the exact layout.
"""

from __future__ import annotations

import argparse
import logging
import sys

from facems.data.pack import pack_image_folder


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, help="image folder, one sub-folder per identity")
    parser.add_argument("--dst", required=True, help="folder to write train.rec, train.idx and property into")
    parser.add_argument("--landmarks", default=None, help="5-point landmarks file: align every image")
    parser.add_argument("--size", type=int, default=112, help="side of the stored images in pixels (112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 0..100 (95)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: this process only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pack in --dst")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = pack_image_folder(
        args.src,
        args.dst,
        landmarks_file=args.landmarks,
        image_size=args.size,
        quality=args.quality,
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"packed {stats.num_images} images of {stats.num_identities} identities into {args.dst}")
    print(f"skipped {len(stats.skipped)} unreadable image(s)")
    for path in stats.skipped:
        print(f"  {path}")
    if stats.dropped_identities:
        print(
            f"dropped {len(stats.dropped_identities)} identities without images: {stats.dropped_identities}"
        )
    rate = stats.num_images / stats.seconds if stats.seconds > 0 else float("nan")
    print(f"time {stats.seconds:.1f} s ({rate:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
