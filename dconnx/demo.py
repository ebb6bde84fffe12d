"""`make demo`: convert the bundled trained model, explain a few images, write heatmaps.

Needs only the runtime dependencies (numpy, onnx, onnxruntime, Pillow).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .api import compile_model
from .eval.synthetic import CLASS_NAMES, denormalize, make_dataset
from .io import save_model
from .runtime import Explainer
from .viz import panel, save_npy, save_png

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "fixture_cnn.onnx"
LAYER = "10"          # the 48×16×16 feature map entering the third MaxPool (see `dconnx layers`)
METHODS = "splitgrad,splitcam,splitlrp"


def grid(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    ap.add_argument("--images", type=int, default=6)
    args = ap.parse_args(argv)
    out = Path(args.out)
    meta = json.loads(MODEL.with_suffix(".json").read_text())

    t0 = time.perf_counter()
    converted, report = compile_model(MODEL, methods=METHODS, layer=LAYER)
    dst = save_model(converted, out / "fixture_cnn.dc.onnx")
    print(f"converted {MODEL.relative_to(ROOT)} -> {dst} in {time.perf_counter() - t0:.2f} s "
          f"({dst.stat().st_size / MODEL.stat().st_size:.3f}x the original size)")
    for h in report.heads:
        print(f"  {h.method}: {h.layer}")

    ds = meta["dataset"]
    x, labels, masks = make_dataset(args.images, size=ds["size"], n_classes=ds["n_classes"],
                                    seed=ds["test_seed"], clutter=ds["clutter"])
    ex = Explainer(dst)
    res = ex(x)
    logits = res["logits"]
    err = float(np.max(np.abs(res["g"] - res["h"] - logits)))
    print(f"onnxruntime provider: {ex.provider}")
    print(f"check: max |(g - h) - logits| = {err:.2e} over {len(x)} images "
          f"(largest |logit| {np.abs(logits).max():.2f})")
    pred = logits.argmax(1)
    print(f"accuracy on these images: {(pred == labels).mean():.2f}")

    rows = []
    hits = {m: 0 for m in ex.methods}
    for i in range(len(x)):
        image = np.clip(np.moveaxis(denormalize(x[i]), 0, -1), 0, 1)
        maps = {m: res[m][i] for m in ex.methods}
        for m, v in maps.items():
            hits[m] += bool(masks[i].reshape(-1)[int(np.argmax(v))])
            save_npy(v, out / "maps" / f"image{i}.{m}.npy")
        title = f"true {CLASS_NAMES[labels[i]]}, predicted {CLASS_NAMES[pred[i]]}"
        tile = panel(image, maps, title)
        save_png(tile, out / "heatmaps" / f"image{i}.png")
        rows.append(tile)
    gallery = save_png(grid(rows), out / "gallery.png")
    print("pointing game (map maximum inside the object): " +
          ", ".join(f"{m} {hits[m]}/{len(x)}" for m in ex.methods))
    print(f"wrote {gallery}, {out / 'heatmaps'}/*.png and raw maps in {out / 'maps'}/*.npy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
