"""The training library under the entry points: train.py, eval.py and scripts/ are thin callers.

One module per concern (see docs/CONTRIBUTING.md for the map); imports go entry points -> engine ->
models / data / configs, and nothing imports an entry point. Import the modules themselves
(`from engine import bench`, `from engine.checkpoint import load_checkpoint`): this file stays empty
so that importing one concern doesn't pull in the others.
"""
