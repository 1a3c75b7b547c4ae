"""Training: state, the one step module, optimizer, mesh, checkpoints, hooks and the loop."""
