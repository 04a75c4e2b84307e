"""Training: the worker loop, its engines (DDP, DeepSpeed), checkpoints, the Ray Train run."""
