"""Built-in backbones: latent DiffiT, DiT and the U-shaped image-space DiffiT.

Each is a factory ``name(preset, **options) -> nn.Module`` registered like a user's would be.
"""

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.backbones.image import image_diffit
from diffit_toolkit.backbones.latent import dit, latent_diffit



@hookimpl
def diffit_register(registrar):
    registrar.add("backbone", "latent_diffit", latent_diffit)
    registrar.add("backbone", "dit", dit)
    registrar.add("backbone", "image_diffit", image_diffit)
