"""Memory-layer operators, one subpackage per family, flash-linear-attention style.

Each op has a recurrent (token-by-token) reference, a pure-torch chunked/parallel form that
agrees with it (outputs and every gradient, tested at awkward lengths), and, where one exists,
a GPU kernel. The layer modules in ``nl_layers`` call these ops; nothing here holds parameters.
``causal_conv`` is the short causal depthwise convolution of the memory layers' inputs.
"""
