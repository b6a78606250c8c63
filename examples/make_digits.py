"""Write a real train/test pair from scikit-learn's bundled digits (no download).

Train: 120 images of the digit 0 ("normal"). Test: the remaining zeros plus 20 other digits
(the anomalies, about 25%), shuffled. Labels are not written: the service never sees them.

    python examples/make_digits.py [OUT_DIR]   # writes digits_train.npz, digits_test.npz
    python examples/make_digits.py OUT_DIR --folders
        # the same images as PNG files laid out as MVTec AD is: OUT_DIR/train/good/*.png
        # and OUT_DIR/test/mixed/*.png (unlabeled: normal and anomalous together)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def write_folders(out: Path, train: np.ndarray, test: np.ndarray) -> None:
    from PIL import Image

    for folder, images in ((out / "train" / "good", train), (out / "test" / "mixed", test)):
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).resize((32, 32), Image.Resampling.NEAREST).save(
                folder / f"{i:03d}.png")
    print(f"wrote {len(train)} PNGs to {out / 'train' / 'good'} and {len(test)} to "
          f"{out / 'test' / 'mixed'}")


def main(out_dir: str = "examples/data", layout: str = "") -> None:
    d = load_digits()
    x = np.rint(d.images / 16 * 255).astype(np.uint8)  # (N, 8, 8)
    zeros, others = x[d.target == 0], x[d.target != 0]
    rng = np.random.default_rng(0)
    test = np.concatenate([zeros[120:], others[rng.choice(len(others), 20, replace=False)]])
    test = test[rng.permutation(len(test))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "--folders":
        write_folders(out, zeros[:120], test)
        return
    np.savez_compressed(out / "digits_train.npz", images=zeros[:120])
    np.savez_compressed(out / "digits_test.npz", images=test)
    print(f"wrote {out / 'digits_train.npz'} ({len(zeros[:120])} images) and "
          f"{out / 'digits_test.npz'} ({len(test)} images)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
