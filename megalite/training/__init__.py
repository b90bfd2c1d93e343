"""The pretraining loop: model building, the step, optimizer, checkpoints, metrics."""
