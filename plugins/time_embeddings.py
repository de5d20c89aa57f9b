"""Built-in time-embedding feature maps."""

from diffit_toolkit import register_time_embedding
from diffit_toolkit.nn.embeddings import FourierFeatures, PositionalFeatures

register_time_embedding("positional", PositionalFeatures)
register_time_embedding("fourier", FourierFeatures)
