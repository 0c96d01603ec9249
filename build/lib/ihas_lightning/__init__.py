"""ihas-lightning: instance-wise Hierarchical Architecture Search (iHAS) for deep recommendation
models, as a PyTorch Lightning experiment framework."""

__version__ = "0.1.0"
