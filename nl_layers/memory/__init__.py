"""Associative memories over tokens: linear (hebbian, delta, dgd), neural (Titans) and softmax attention."""

from .attention import AttentionMemory, AttentionMemoryState, memory_objective, softmax_memory, softmax_memory_reference
from .linear import LinearMemory, LinearMemoryState, linear_memory_chunked, linear_memory_recurrent
from .mlp import LinearMapMemory, ResidualMLPMemory
from .neural import NeuralMemory, NeuralMemoryState

__all__ = [
    "AttentionMemory",
    "AttentionMemoryState",
    "LinearMapMemory",
    "LinearMemory",
    "LinearMemoryState",
    "NeuralMemory",
    "NeuralMemoryState",
    "ResidualMLPMemory",
    "linear_memory_chunked",
    "linear_memory_recurrent",
    "memory_objective",
    "softmax_memory",
    "softmax_memory_reference",
]
