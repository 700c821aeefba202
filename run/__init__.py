"""The run lifecycle: checkpoints, resume, exact-resume RNG state, run folders, preemption, fine-tuning,
distributed set-up, EMA, warm-up, parameter groups, and rebuilding a model from a checkpoint."""
