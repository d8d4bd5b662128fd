"""Training: data, objectives, the loop, run directories and comparisons."""
