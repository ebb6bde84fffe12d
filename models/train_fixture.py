"""Train the bundled fixture model on the synthetic localization data and export it.

    .venv/bin/python models/train_fixture.py            # writes models/fixture_cnn.{onnx,json}

A small VGG-like ReLU CNN (Conv+BatchNorm+ReLU blocks, one overlapping 3x3
stride-2 max pool, 2x2 max pools, global average pool, linear head) trained on
`dconnx.eval.synthetic.make_dataset` on CPU (2 threads) with fixed seeds.
It is exported with the TorchScript exporter in eval mode with
``do_constant_folding=False``, which keeps the BatchNormalization nodes (the
compiler must fold them itself); the default ``do_constant_folding=True``
folds every BN into the preceding Conv. ``training=TrainingMode.PRESERVE``
keeps them too but warns; it is not used.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import torchvision_ops  # noqa: E402,F401  (import shim; keeps torchvision importable if pulled in)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dconnx.eval.synthetic import CLASS_NAMES, MEAN, STD, make_dataset  # noqa: E402

# dataset parameters (recorded in the json; tests regenerate the test set from them)
DATA = dict(size=64, n_classes=4, clutter=True, train_seed=0, n_train=8000,
            test_seed=1, n_test=2000)
OPSET = 17


class FixtureCNN(nn.Module):
    """VGG-like stack; `features` indices are the layer indices used in the docs."""

    def __init__(self, n_classes: int = 4):
        super().__init__()

        def cbr(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *cbr(3, 16),                            # 0-2    64x64
            nn.MaxPool2d(3, stride=2, padding=1),   # 3      -> 32x32 (overlapping windows)
            *cbr(16, 32),                           # 4-6
            nn.MaxPool2d(2),                        # 7      -> 16x16
            *cbr(32, 48),                           # 8-10
            *cbr(48, 48),                           # 11-13
            nn.MaxPool2d(2),                        # 14     -> 8x8
            *cbr(48, 64),                           # 15-17
        )
        self.pool = nn.AdaptiveAvgPool2d(1)         # GlobalAveragePool
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90-degree rotations (the classes are invariant)."""
    b = xb.shape[0]
    flip_h = torch.rand(b, generator=gen) < 0.5
    flip_v = torch.rand(b, generator=gen) < 0.5
    xb = torch.where(flip_h[:, None, None, None], xb.flip(3), xb)
    xb = torch.where(flip_v[:, None, None, None], xb.flip(2), xb)
    if torch.rand(1, generator=gen).item() < 0.5:
        xb = xb.transpose(2, 3)
    return xb


def train(args) -> tuple[nn.Module, float, list]:
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t0 = time.time()
    xtr, ytr, _ = make_dataset(DATA["n_train"], size=DATA["size"], n_classes=DATA["n_classes"],
                               seed=DATA["train_seed"], clutter=DATA["clutter"])
    xte, yte, _ = make_dataset(DATA["n_test"], size=DATA["size"], n_classes=DATA["n_classes"],
                               seed=DATA["test_seed"], clutter=DATA["clutter"])
    print(f"data: {len(xtr)} train / {len(xte)} test in {time.time() - t0:.1f}s", flush=True)
    xtr, ytr = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xte, yte = torch.from_numpy(xte), torch.from_numpy(yte)

    model = FixtureCNN(DATA["n_classes"]).to(memory_format=torch.channels_last)  # faster on CPU
    xtr = xtr.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(xtr) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        model.train()
        t_ep = time.time()
        perm = torch.randperm(len(xtr), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(xtr), args.batch):
            idx = perm[i:i + args.batch]
            xb = augment(xtr[idx], gen)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        acc = evaluate(model, xte, yte)
        history.append(dict(epoch=epoch + 1, loss=loss_sum / len(xtr), test_acc=acc))
        print(f"epoch {epoch + 1:2d}/{args.epochs} loss {loss_sum / len(xtr):.4f} "
              f"test acc {acc:.4f} ({time.time() - t_ep:.0f}s)", flush=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, evaluate(model, xte, yte), history


def export(model: nn.Module, path: pathlib.Path) -> None:
    model.eval()
    x = torch.zeros(2, 3, DATA["size"], DATA["size"])
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=OPSET,
                      do_constant_folding=False,  # keeps BatchNormalization nodes
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert n_bn == 5, f"expected 5 BatchNormalization nodes, found {n_bn}"
    assert proto.ir_version <= 13, proto.ir_version


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "fixture_cnn.onnx")
    args = ap.parse_args(argv)

    t0 = time.time()
    model, acc, history = train(args)
    train_s = time.time() - t0
    print(f"final test accuracy {acc:.4f} after {train_s:.0f}s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(model, args.out)

    # check the exported file against torch on the test set
    import onnxruntime as ort
    xte, yte, _ = make_dataset(DATA["n_test"], size=DATA["size"], n_classes=DATA["n_classes"],
                               seed=DATA["test_seed"], clutter=DATA["clutter"])
    sess = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": xte[i:i + 500]})[0]
                             for i in range(0, len(xte), 500)])
    onnx_acc = float((logits.argmax(1) == yte).mean())
    with torch.no_grad():
        ref = model(torch.from_numpy(xte[:64])).numpy()
    rel = float(np.abs(logits[:64] - ref).max() / np.abs(ref).max())
    print(f"onnxruntime test accuracy {onnx_acc:.4f}; max rel diff to torch {rel:.2e}")
    assert rel < 1e-4

    cmd = ".venv/bin/python models/train_fixture.py"
    defaults = ap.parse_args([])
    extra = [f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v != getattr(defaults, k)]
    meta = {
        "file": args.out.name,
        "description": "VGG-like ReLU CNN (Conv+BN+ReLU, MaxPool incl. one 3x3/s2 overlapping, "
                       "GlobalAveragePool, Linear) trained on dconnx.eval.synthetic data; "
                       "BatchNormalization nodes are kept (not folded).",
        "input_name": "input",
        "output_name": "logits",
        "input_shape": ["batch", 3, DATA["size"], DATA["size"]],
        "output_shape": ["batch", DATA["n_classes"]],
        "class_names": list(CLASS_NAMES[:DATA["n_classes"]]),
        "normalization": {"mean": [round(float(v), 6) for v in MEAN],
                          "std": [round(float(v), 6) for v in STD],
                          "note": "make_dataset already returns normalized images"},
        "dataset": {"generator": "dconnx.eval.synthetic.make_dataset", **DATA},
        "test_accuracy": round(onnx_acc, 4),
        "test_accuracy_torch": round(acc, 4),
        "history": history,
        "training": {"command": " ".join([cmd, *extra]), "epochs": args.epochs,
                     "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "threads": args.threads, "optimizer": "AdamW(wd=1e-4) + OneCycleLR",
                     "augmentation": "flips and transposes", "seconds": round(train_s),
                     "torch": torch.__version__},
        "export": {"exporter": "torchscript", "opset": OPSET, "do_constant_folding": False,
                   "ir_version": onnx.load(str(args.out), load_external_data=False).ir_version},
        "layers": {str(i): type(m).__name__ for i, m in enumerate(model.features)},
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) and "
          f"{args.out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
