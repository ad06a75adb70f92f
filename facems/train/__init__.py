"""Training: optimizer and schedule builders, checkpoints, and (to come) the loop."""
