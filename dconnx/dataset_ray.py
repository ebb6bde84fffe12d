"""The Ray Data engine of `explain-dataset`: one onnxruntime session per Ray actor.

Needs the `ray` extra (`pip install 'dconnx[ray]'`). The model file and the images must be
readable at the same paths on every node (a shared file system); result batches stream back
to the driver, which writes the same chunks as the local engine.
"""
from __future__ import annotations

from .errors import OptionError


class _Actor:
    """A Ray Data callable class: Ray builds one per actor, so each actor owns one session.
    `explainer` is dataset.BatchExplainer, passed in (this module does not import dataset,
    which imports it)."""

    def __init__(self, explainer, model, target, alpha, threads):
        self.explain = explainer(model, target=target, alpha=alpha, threads=threads)

    def __call__(self, batch: dict) -> dict:
        return self.explain(list(batch["path"]), batch["index"])


def ray_batches(explainer, model, paths: list[str], indices: list[int], *, batch_size: int, target=None,
                alpha=None, threads=None, address=None, actors: int = 1):
    """Result batches of `explainer` (dataset.BatchExplainer) from a Ray Data pipeline, as they
    complete."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise OptionError("--engine ray needs Ray Data: pip install 'dconnx[ray]'") from None
    started = not ray.is_initialized()
    if started:
        # address None starts a local instance; "auto" or ray://host:port joins a cluster
        kwargs = {"log_to_driver": False, "logging_level": "warning"}
        kwargs.update({"address": address} if address else {"include_dashboard": False})
        ray.init(**kwargs)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False       # dconnx draws its own
        ctx.verbose_progress = False
        items = [{"path": p, "index": int(i)} for p, i in zip(paths, indices)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 64)))
        ds = ds.map_batches(_Actor, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=int(actors)), num_cpus=1,
                            fn_constructor_kwargs={"explainer": explainer, "model": str(model), "target": target, "alpha": alpha,
                                                   "threads": threads})
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch
    finally:
        if started:
            ray.shutdown()
