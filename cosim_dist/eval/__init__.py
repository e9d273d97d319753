"""Evaluation: samplers over per-seed inputs (samplers.py), the toy world's exact evaluation (toy.py), the real-model
FID / FD-DINOv2 evaluation (real.py) with its decoding (decode.py), feature metrics (features.py, extractors.py) and
statistics (metrics.py); eval.json rows and the printed table (results.py)."""
