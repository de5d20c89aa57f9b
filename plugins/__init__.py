"""The built-in plugins of diffit-toolkit, registered exactly like a third party's.

This package (installed as ``diffit_plugins``) is the target of the ``builtin`` entry point in
the ``diffit_toolkit.plugins`` group. Each module implements the ``diffit_register`` hook; the
package's hook runs them all.
"""

from diffit_plugins import (
    adaln,
    adaln_single,
    adaln_zero,
    additive,
    attention_backends,
    backbones,
    cross_attention,
    datasets,
    in_context,
    mlp,
    processes,
    relative_bias,
    separate_token,
    time_embeddings,
    tmsa,
    triton_attention,
)
from diffit_toolkit.hookspecs import hookimpl

MODULES = (adaln, adaln_single, adaln_zero, additive, attention_backends, backbones, cross_attention, datasets,
           in_context, mlp, processes, relative_bias, separate_token, time_embeddings, tmsa, triton_attention)


@hookimpl
def diffit_register(registrar):
    for module in MODULES:
        module.diffit_register(registrar)
