"""torchvision interoperability: weight conversion, stage-wise comparison, the model
checkpoint format."""
