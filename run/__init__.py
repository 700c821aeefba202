"""The run lifecycle: checkpoints, resume, exact-resume RNG state, run folders, preemption, fine-tuning,
distributed set-up, and rebuilding a model from a checkpoint."""
