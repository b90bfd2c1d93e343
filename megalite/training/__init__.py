"""The loop shared by every stage: model building, the step, optimizer, precision, metrics."""
