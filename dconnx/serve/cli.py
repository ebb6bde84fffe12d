"""The deployment subcommands of `dconnx`: serve, export-triton, explain-dataset.

Thin argparse blocks over dconnx.serve and dconnx.dataset (added by dconnx.cli.build_parser).
"""
from __future__ import annotations

from ..errors import OptionError


def _ints(text: str | None) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise OptionError(f"expected comma-separated integers, got '{text}'") from None


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from . import ServeConfig, serve
    except ImportError as e:
        raise OptionError(f"dconnx serve needs the serving extra ({e.name} is missing): "
                          "pip install 'dconnx[serve]'") from None
    config = ServeConfig(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                         max_request_samples=args.max_request_samples or min(args.max_batch, 32),
                         max_body_bytes=args.max_body_bytes, timeout_s=args.timeout, max_queue=args.max_queue,
                         threads=args.threads, max_connections=args.max_connections, log_level=args.log_level,
                         max_decoding=args.max_decoding, header_timeout_s=args.header_timeout,
                         body_timeout_s=args.body_timeout)
    serve(args.model, args.host, args.port, config.validate())
    return 0


def cmd_export_triton(args) -> int:
    from .triton import export_triton
    res = export_triton(args.model, args.repo, args.name, version=args.version, max_batch_size=args.max_batch_size,
                        max_queue_delay_us=args.max_queue_delay_us,
                        preferred_batch_sizes=_ints(args.preferred_batch_sizes),
                        instances=args.instances, instance_kind=args.instance_kind, overwrite=args.force)
    print(f"wrote {res.config_path} and {res.model_path}")
    for note in res.notes:
        print(f"  note: {note}")
    return 0


def cmd_explain_dataset(args) -> int:
    from ..dataset import explain_dataset
    run = explain_dataset(args.model, args.folder, args.output, batch_size=args.batch_size,
                          chunk_size=args.chunk_size, target=args.target, alpha=args.alpha, engine=args.engine,
                          resume=args.resume, progress=not args.no_progress, threads=args.threads,
                          ray_address=args.ray_address, ray_actors=args.ray_actors)
    print(run.summary())
    return 0


def add_deploy_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve predictions and maps over HTTP (needs dconnx[serve])",
                       description="Serve a converted model's predictions and attribution maps over HTTP "
                                   "(needs the dconnx[serve] extra).")
    p.add_argument("model", help="a converted .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="samples merged into one onnxruntime call")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--max-request-samples", type=int, default=None, help="samples in one request (default "
                   "min(max-batch, 32))")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20,
                   help="largest request body before a 413 (default 16 MiB)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request before a 504")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before a 503")
    p.add_argument("--max-connections", type=int, default=None, help="requests in flight before a 503 (/healthz and /metrics exempt); open "
                   "connections are capped at 4x this")
    p.add_argument("--max-decoding", type=int, default=2,
                   help="requests read and decoded at once; the others wait (default 2)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's line and headers to arrive, else the connection closes "
                        "with a 408 (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request's body to arrive, else a 408 (default 30)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default info)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("export-triton", help="write a Triton Inference Server model repository entry",
                       description="Write a converted model and its config.pbtxt into a Triton Inference "
                                   "Server model repository (ONNX Runtime backend).")
    p.add_argument("model", help="a converted .onnx file")
    p.add_argument("repo", help="the model repository folder")
    p.add_argument("--name", default=None, help="model name (default: the file name without .dc.onnx)")
    p.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="0 = no batching (exposes target and alpha)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long Triton's dynamic batcher waits for more requests (default 2000)")
    p.add_argument("--preferred-batch-sizes", default=None, help="comma list, e.g. 4,8")
    p.add_argument("--instances", type=int, default=1, help="model instances Triton runs (default 1)")
    p.add_argument("--instance-kind", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the instances run (default auto: Triton's choice)")
    p.add_argument("--force", action="store_true", help="replace an existing entry")
    p.set_defaults(func=cmd_export_triton)
    p = sub.add_parser("explain-dataset", help="explain every image under a folder; maps in .npz chunks",
                       description="Explain every image under a folder with a converted model; writes the "
                                   "maps in .npz chunks and a manifest.json.")
    p.add_argument("model", help="a converted .onnx file")
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="output folder (chunks + manifest.json)")
    p.add_argument("--batch-size", type=int, default=16, help="images per onnxruntime call (default 16)")
    p.add_argument("--chunk-size", type=int, default=256, help="images per chunk file")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the argmax)")
    p.add_argument("--alpha", type=float, default=None, help="alpha (default: the model's)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one onnxruntime session here; ray: one per Ray actor (default local)")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: start a local instance)")
    p.add_argument("--ray-actors", type=int, default=1, help="Ray actors, one onnxruntime session each")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per session")
    p.add_argument("--resume", action="store_true", help="keep the chunks already written")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explain_dataset)
