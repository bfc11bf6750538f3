"""Memory layers over tokens (Nested Learning): linear and deep associative memories, Titans,
softmax attention as a memory, the Continuum Memory System, self-modifying Titans, HOPE, small
language models, and nest() to put CMS levels into an existing model.

Example:
    >>> import torch, nl_layers
    >>> lm = nl_layers.HopeLM(vocab_size=64, dim=32, depth=2, heads=2, cms_periods=(1, 4))
    >>> logits = lm(torch.randint(0, 64, (2, 16)))
    >>> spec = lm.level_spec()    # {parameter name: period} for deepopt / the Lightning callback
"""

from . import data
from ._checks import finite_checks, finite_checks_enabled, set_finite_checks, set_value_checks, value_checks, value_checks_enabled
from ._kernels import set_triton_kernels, triton_kernels, triton_kernels_enabled
from .cms import CMS, MLPBlock
from .cms_in_context import CMSState
from .graphed import graphed_step
from .graphed_loss import graphed_loss
from .hope import HopeAttentionBlock, HopeBlock, HopeBlockState
from .lm import HopeLM, TitansLM, TransformerLM
from .memory import (
    AttentionMemory,
    AttentionMemoryState,
    LinearMapMemory,
    LinearMemory,
    LinearMemoryState,
    NeuralMemory,
    NeuralMemoryState,
    ResidualMLPMemory,
    linear_memory_chunked,
    linear_memory_recurrent,
    memory_objective,
    softmax_memory,
    softmax_memory_reference,
)
from .nest import nest
from .self_modifying import SelfModifyingState, SelfModifyingTitans

__all__ = [
    "AttentionMemory",
    "AttentionMemoryState",
    "CMS",
    "CMSState",
    "HopeAttentionBlock",
    "HopeBlock",
    "HopeBlockState",
    "HopeLM",
    "LinearMapMemory",
    "LinearMemory",
    "LinearMemoryState",
    "MLPBlock",
    "NeuralMemory",
    "NeuralMemoryState",
    "ResidualMLPMemory",
    "SelfModifyingState",
    "SelfModifyingTitans",
    "TitansLM",
    "TransformerLM",
    "data",
    "finite_checks",
    "finite_checks_enabled",
    "graphed_loss",
    "graphed_step",
    "linear_memory_chunked",
    "linear_memory_recurrent",
    "memory_objective",
    "nest",
    "set_finite_checks",
    "set_triton_kernels",
    "set_value_checks",
    "softmax_memory",
    "softmax_memory_reference",
    "triton_kernels",
    "triton_kernels_enabled",
    "value_checks",
    "value_checks_enabled",
]
