"""Evaluation helpers: synthetic localization data with ground-truth masks."""
