"""Checkpoints and sources: presets, dense sources, save and load, rebuilding structure, summaries, file I/O."""
