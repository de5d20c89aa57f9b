"""The built-in plugins of diffit-toolkit, registered exactly like a third party's.

This package (installed as ``diffit_plugins``) is the target of the ``builtin`` entry point in
the ``diffit_toolkit.plugins`` group; importing it registers every built-in mechanism,
attention backend and time embedding through the public ``register_*`` functions.
"""

from diffit_plugins import (  # noqa: F401  (imported for their registrations)
    additive,
    adaln_zero,
    attention_backends,
    backbones,
    mlp,
    relative_bias,
    separate_token,
    time_embeddings,
    tmsa,
    triton_attention,
)
