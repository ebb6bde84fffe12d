"""`dconnx explain-dataset`: attribution maps for every image under a folder, written in chunks.

    OUT/chunk-00000.npz   files (paths relative to the folder), index, logits, target, one
                          [n, H, W] float32 array per method; images i*chunk .. (i+1)*chunk - 1
    OUT/manifest.json     model, methods, chunk size, the chunks written so far, unreadable images

Chunks and the manifest are replaced atomically, so `--resume` after an interruption skips the
chunks already written. Two engines feed the same writer: "local" (one onnxruntime session in
this process) and "ray" (one session per Ray actor; see dconnx/dataset_ray.py).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DconnxError, InputError, OptionError, OutputError
from .io import atomic_write

ENGINES = ("local", "ray")


class BatchExplainer:
    """Image paths → one result batch (the unit both engines produce). Rows of unreadable images
    are kept with ok=False, zeros and the reason, so a batch always has one row per path."""

    def __init__(self, model, target=None, alpha=None, threads=None, providers=None):
        from .images import ImageInput
        from .runtime import Explainer
        self.ex = Explainer(model, providers=providers, threads=threads)
        if not self.ex.methods:
            raise OptionError("the model has no attribution outputs; convert it with --methods")
        self.images = ImageInput.from_explainer(self.ex)
        self.target, self.alpha = target, alpha
        self.explained = self.ex.meta.get("dconnx.explained")
        if self.explained not in self.ex.output_names:
            self.explained = self.ex.output_names[0]
        probe = self.ex(np.zeros((1, *self._sample_shape()), np.float32), target=target, alpha=alpha)
        self.shapes = {k: probe[k].shape[1:] for k in [self.explained, *self.ex.methods]}

    def _sample_shape(self):
        im = self.images
        return (im.height, im.width, im.channels) if im.channel_axis == 3 else (im.channels, im.height, im.width)

    def __call__(self, paths, indices) -> dict:
        n = len(paths)
        res = {"index": np.asarray(indices, np.int64), "ok": np.zeros(n, bool),
               "error": np.full(n, "", dtype=object), "target": np.full(n, -1, np.int64),
               "logits": np.zeros((n, *self.shapes[self.explained]), np.float32)}
        for m in self.ex.methods:
            res[m] = np.zeros((n, *self.shapes[m]), np.float32)
        xs, rows = [], []
        for i, p in enumerate(paths):
            try:
                xs.append(self.images.load(p)[0])
                rows.append(i)
            except InputError as e:
                res["error"][i] = str(e)
        if rows:
            out = self.ex(np.stack(xs), target=self.target, alpha=self.alpha)
            scores = out[self.explained].reshape(len(rows), -1)
            tgt = scores.argmax(-1)
            if self.target is not None and self.target >= 0:
                tgt = np.full(len(rows), self.target)
            res["ok"][rows] = True
            res["target"][rows] = tgt
            res["logits"][rows] = out[self.explained]
            for m in self.ex.methods:
                res[m][rows] = out[m]
        res["error"] = res["error"].astype(str)
        return res


@dataclass
class DatasetRun:
    out: Path
    images: int
    explained: int = 0
    skipped_chunks: int = 0
    chunks: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.explained / self.seconds if self.seconds else 0.0
        return (f"explained {self.explained} of {self.images} images in {self.seconds:.1f} s ({rate:.1f}/s); "
                f"{len(self.chunks)} chunk(s) in {self.out}"
                + (f", {self.skipped_chunks} already there" if self.skipped_chunks else "")
                + (f"; {len(self.failed)} unreadable (listed in manifest.json)" if self.failed else ""))


def _savez(path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


class ChunkWriter:
    """Collects result rows (in any order) and writes each chunk once all its images are in."""

    def __init__(self, out: Path, names: list[str], chunk_size: int, manifest: dict, run: DatasetRun):
        self.out, self.names, self.chunk_size = out, names, chunk_size
        self.manifest, self.run = manifest, run
        self.pending: dict[int, dict[int, dict]] = {}

    def chunk_rows(self, k: int) -> range:
        return range(k * self.chunk_size, min((k + 1) * self.chunk_size, len(self.names)))

    def add(self, batch: dict) -> None:
        keys = [k for k in batch if k not in ("index", "ok", "error")]
        for r, idx in enumerate(batch["index"].tolist()):
            row = {"ok": bool(batch["ok"][r]), "error": str(batch["error"][r])}
            row.update({k: batch[k][r] for k in keys})
            k = idx // self.chunk_size
            self.pending.setdefault(k, {})[idx] = row
            if len(self.pending[k]) == len(self.chunk_rows(k)):
                self._write(k, self.pending.pop(k))

    def _write(self, k: int, rows: dict[int, dict]) -> None:
        order = sorted(rows)
        ok = [i for i in order if rows[i]["ok"]]
        failed = [{"file": self.names[i], "error": rows[i]["error"]} for i in order if not rows[i]["ok"]]
        arrays = {"files": np.asarray([self.names[i] for i in ok], dtype=str),
                  "index": np.asarray(ok, np.int64)}
        if ok:
            for key in rows[ok[0]]:
                if key not in ("ok", "error"):
                    arrays[key] = np.stack([rows[i][key] for i in ok])
        path = self.out / f"chunk-{k:05d}.npz"
        atomic_write(path, lambda tmp: _savez(tmp, arrays))
        entry = {"file": path.name, "first": order[0], "count": len(order), "explained": len(ok),
                 "first_file": self.names[order[0]], "last_file": self.names[order[-1]], "failed": failed}
        self.manifest["chunks"] = sorted([c for c in self.manifest["chunks"] if c["file"] != path.name]
                                         + [entry], key=lambda c: c["first"])
        self.run.chunks.append(path)
        self.run.explained += len(ok)
        self.run.failed += failed
        self.save()

    def save(self) -> None:
        self.manifest["failed"] = [f for c in self.manifest["chunks"] for f in c["failed"]]
        text = json.dumps(self.manifest, indent=1)
        atomic_write(self.out / "manifest.json", lambda tmp: Path(tmp).write_text(text))


class Progress:
    """tqdm when it is installed, else a line on stderr every few seconds."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "explain"):
        self.total, self.done, self.enabled, self.t0, self.last = total, 0, enabled, time.time(), 0.0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.time() - self.last > 2 or self.done == self.total):
            self.last = time.time()
            print(f"explain: {self.done}/{self.total} images ({time.time() - self.t0:.0f} s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _completed(manifest: dict, names: list[str], chunk_size: int, out: Path) -> set[int]:
    done = set()
    for c in manifest.get("chunks", []):
        k = c["first"] // chunk_size
        rows = range(k * chunk_size, min((k + 1) * chunk_size, len(names)))
        if (c["first"] == rows.start and c["count"] == len(rows) and (out / c["file"]).is_file()
                and names[rows.start] == c["first_file"] and names[rows.stop - 1] == c["last_file"]):
            done.add(k)
    return done


def explain_dataset(model, folder, out, *, batch_size: int = 16, chunk_size: int = 256, target=None,
                    alpha=None, engine: str = "local", resume: bool = False, progress: bool = True,
                    threads=None, ray_address=None, ray_actors: int = 1) -> DatasetRun:
    """Explain every image under `folder` with a converted model; maps go to `out` in chunks."""
    from .images import list_images
    if engine not in ENGINES:
        raise OptionError(f"engine '{engine}' is not one of {', '.join(ENGINES)}")
    if batch_size < 1 or chunk_size < 1:
        raise OptionError("batch size and chunk size must be at least 1")
    folder, out = Path(folder), Path(out)
    files = list_images(folder)
    if not files:
        raise InputError(f"no images ({', '.join(('png', 'jpg', '...'))}) under '{folder}'")
    names = [p.relative_to(folder).as_posix() for p in files]
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write into '{out}': it is a file, not a folder")
    t0 = time.perf_counter()
    probe = BatchExplainer(model, target=target, alpha=alpha, threads=threads)   # checks model and options
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make the output folder '{out}': {e.strerror or e}") from e
    manifest_path = out / "manifest.json"
    try:
        old = json.loads(manifest_path.read_text()) if resume and manifest_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise OptionError(f"--resume: cannot read '{manifest_path}' ({e}); remove it to start over") from e
    if old and old.get("chunk_size") != chunk_size:
        raise OptionError(f"--resume with chunk size {chunk_size}, but {out} was written with "
                          f"{old.get('chunk_size')}")
    manifest = {"model": str(model), "folder": str(folder), "images": len(names), "chunk_size": chunk_size,
                "methods": probe.ex.methods, "explained_output": probe.explained,
                "target": target, "alpha": alpha if alpha is not None else probe.ex.options.get("alpha_default"),
                "engine": engine, "chunks": old.get("chunks", []) if old else []}
    run = DatasetRun(out, len(names))
    writer = ChunkWriter(out, names, chunk_size, manifest, run)
    done = _completed(manifest, names, chunk_size, out) if resume else set()
    manifest["chunks"] = [c for c in manifest["chunks"] if c["first"] // chunk_size in done]
    run.skipped_chunks = len(done)
    todo = [i for i in range(len(names)) if i // chunk_size not in done]
    bar = Progress(len(names), progress)
    bar.update(len(names) - len(todo))
    try:
        if engine == "local":
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                writer.add(probe([files[i] for i in idx], idx))
                bar.update(len(idx))
        else:
            from .dataset_ray import ray_batches
            for batch in ray_batches(BatchExplainer, model, [str(files[i]) for i in todo], todo,
                                     batch_size=batch_size, target=target, alpha=alpha, threads=threads,
                                     address=ray_address, actors=ray_actors):
                writer.add(batch)
                bar.update(len(batch["index"]))
    finally:
        bar.close()
    if writer.pending:
        raise DconnxError(f"chunks {sorted(writer.pending)} were not completed")
    writer.save()
    run.seconds = time.perf_counter() - t0
    return run


def load_chunks(out) -> dict[str, np.ndarray]:
    """All chunks of an explain-dataset output, concatenated in image order."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [dict(np.load(out / c["file"])) for c in manifest["chunks"] if c["explained"]]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
