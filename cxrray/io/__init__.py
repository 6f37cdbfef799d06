"""Checkpoint files, below the families: safetensors + JSON checkpoints (`checkpoint`) and model cards
(`card`). Plain files in and out, no model built; nothing here unpickles. Loading a checkpoint as a model of
its family lives one layer up, in `cxrray.models`."""
