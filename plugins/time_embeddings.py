"""Built-in time-embedding feature maps."""

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.embeddings import FourierFeatures, PositionalFeatures



@hookimpl
def diffit_register(registrar):
    registrar.add("time_embedding", "positional", PositionalFeatures)
    registrar.add("time_embedding", "fourier", FourierFeatures)
