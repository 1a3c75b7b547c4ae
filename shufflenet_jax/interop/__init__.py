"""torchvision interoperability and deployment: weight conversion, stage-wise comparison,
export to StableHLO, ONNX and LiteRT."""
