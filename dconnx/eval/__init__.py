"""Explanation quality: metrics, sanity checks and benchmarks (`dconnx eval`).

* `synthetic` — the planted-evidence data set with ground-truth masks (numpy only).
* `metrics` — Pointing Game, Attribution Localisation, Pixel Flipping, Selectivity,
  Max-Sensitivity, SSIM (scikit-image's, Quantus', Sixt et al.'s), Random Logit, MPRT,
  per-location cosine similarities for CSC; numpy only, Quantus 0.6's definitions.
* `randomize` — cascading parameter randomization of an ONNX model's initializers.
* `runner` — `Attributor`: maps, logits and injected relevance vectors through
  dconnx-converted models in ONNX Runtime.
* `data`, `benchmark`, `plots`, `cli` — the `dconnx eval` command (plots need the
  ``eval`` extra: matplotlib; the photo set scikit-image).

Importing this package imports nothing beyond numpy.
"""
