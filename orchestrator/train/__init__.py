"""Training: the per-worker loop, its engines (DDP, DeepSpeed), checkpoints and the Ray Train run."""
