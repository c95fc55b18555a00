"""Code only the recipes use: the embedded demo's data (demo.py, demo_highres.py), what a demo run reports
(metrics.py), the high-resolution demos' tiled-vs-one-tile comparison (tiling_demo.py) and the encoder /
connector ablation runner (ablation.py). The library (vlmkit's other packages) never imports from here.

This file imports nothing, so that importing one of these modules loads only what it needs.
"""
