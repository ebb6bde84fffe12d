"""Limits and batching settings of `dconnx serve` (no serving imports here)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError


@dataclass
class ServeConfig:
    max_batch: int = 32              # samples in one onnxruntime call (requests are merged up to this)
    max_delay_ms: float = 2.0        # how long the first request of a batch waits for company
    max_request_samples: int = 32    # samples in one request (more → 422)
    max_body_bytes: int = 16 << 20   # request body (more → 413)
    timeout_s: float = 30.0          # queue wait + inference of one request (more → 504)
    max_queue: int = 1024            # requests waiting for a batch (more → 503)
    threads: int | None = None       # onnxruntime intra-op threads (default: onnxruntime's)
    providers: tuple | None = None   # onnxruntime providers (default: CUDA when usable, then CPU)
    max_connections: int | None = None   # requests in flight (more → 503); open connections ≤ 4×
    max_decoding: int = 2            # requests whose bodies are read and decoded at once (others wait)
    header_timeout_s: float = 10.0   # a connection's request line and headers must arrive within this
    body_timeout_s: float = 30.0     # a request's body must arrive within this once it is read (more → 408)
    log_level: str = "info"

    def validate(self) -> "ServeConfig":
        for name in ("max_batch", "max_request_samples", "max_body_bytes", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise OptionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_request_samples > self.max_batch:
            raise OptionError(f"max_request_samples ({self.max_request_samples}) cannot exceed "
                              f"max_batch ({self.max_batch})")
        if int(self.max_decoding) < 1:
            raise OptionError(f"max_decoding must be at least 1, got {self.max_decoding}")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise OptionError("header_timeout_s and body_timeout_s must be > 0")
        if self.max_delay_ms < 0 or self.timeout_s <= 0:
            raise OptionError("max_delay_ms must be >= 0 and timeout_s > 0")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise OptionError(f"log level '{self.log_level}' is not one of debug, info, warning, error")
        return self
