"""Built-in backbones: latent DiffiT, DiT and the U-shaped image-space DiffiT.

Each is a factory ``name(preset, **options) -> nn.Module`` registered like a user's would be.
"""

from diffit_toolkit import register_backbone
from diffit_toolkit.backbones.image import image_diffit
from diffit_toolkit.backbones.latent import dit, latent_diffit

register_backbone("latent_diffit", latent_diffit)
register_backbone("dit", dit)
register_backbone("image_diffit", image_diffit)
