"""Models: per-field embeddings, the MLP backbone, the Bernoulli gate, and the DLRM that composes them."""

from .dlrm import DLRM
from .embedding import FieldEmbedding
from .gate import BernoulliGate, gate_regularizer, threshold_search
from .mlp import MLP

__all__ = ["DLRM", "FieldEmbedding", "BernoulliGate", "MLP", "gate_regularizer", "threshold_search"]
