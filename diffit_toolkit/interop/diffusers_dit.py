"""diffusers' ``DiTTransformer2DModel`` weights in and out of the toolkit's ``dit`` backbone.

diffusers keeps DiT's weights under other names and repeats the timestep and label embedders
in every block (``transformer_blocks.{i}.norm1.emb``); the forward is DiT's except for two
constants of the diffusers class: its time features use ``downscale_freq_shift=1`` (the toolkit
option ``time_feature_options: {freq_shift: 1}``) and the LayerNorm before each MLP uses
``norm_eps`` (1e-5 by default; DiT and the toolkit use 1e-6 everywhere, so a model with the
default differs from its import by float rounding of that epsilon, about 1e-5 relative).
The MLP of the toolkit's DiT uses the tanh-approximated GELU (diffusers' ``activation_fn:
"gelu-approximate"``, its default); a folder whose ``config.json`` asks for another activation
(exact ``"gelu"``, ``"geglu"``, ...) is refused, since its import would compute another function.

| diffusers key | DiT key (then [`released`][diffit_toolkit.interop.released]) |
| --- | --- |
| `pos_embed.proj.*` | `x_embedder.proj.*` |
| `transformer_blocks.0.norm1.emb.timestep_embedder.linear_{1,2}.*` | `t_embedder.mlp.{0,2}.*` |
| `transformer_blocks.0.norm1.emb.class_embedder.embedding_table.*` | `y_embedder.embedding_table.*` |
| `transformer_blocks.{i}.norm1.linear.*` | `blocks.{i}.adaLN_modulation.1.*` |
| `transformer_blocks.{i}.attn1.to_{q,k,v}.*` (concatenated) | `blocks.{i}.attn.qkv.*` |
| `transformer_blocks.{i}.attn1.to_out.0.*` | `blocks.{i}.attn.proj.*` |
| `transformer_blocks.{i}.ff.net.0.proj.*`, `ff.net.2.*` | `blocks.{i}.mlp.fc1.*`, `mlp.fc2.*` |
| `proj_out_1.*`, `proj_out_2.*` | `final_layer.adaLN_modulation.1.*`, `final_layer.linear.*` |

The position embedding is not stored by diffusers (a non-persistent buffer); it is DiT's fixed
sin-cos table of the patch grid, which needs the input size: from the folder's ``config.json``
(``sample_size``) or ``input_size=``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffit_toolkit.errors import read_json_object
from diffit_toolkit.backbones.layers import sincos_2d
from diffit_toolkit.backbones.latent import LatentDiffiT

#: Marker of the diffusers layout.
DIFFUSERS_PREFIX = "transformer_blocks."
#: File names of a diffusers model folder.
DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
#: The file that marks a diffusers pipeline folder (its models lie in subfolders).
DIFFUSERS_PIPELINE_INDEX = "model_index.json"
#: A variant weights file (``save_pretrained(variant="fp16")``): ``diffusion_pytorch_model.fp16.safetensors``.
_VARIANT = re.compile(r"^diffusion_pytorch_model\.([A-Za-z0-9_]+)\.safetensors$")
#: Time-feature option that matches diffusers' ``Timesteps(downscale_freq_shift=1)``.
DIFFUSERS_TIME_OPTIONS = {"freq_shift": 1.0}

_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_EMB = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}


def is_diffusers_dit(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` has diffusers' DiT keys (``transformer_blocks.N.norm1.linear``)."""
    return any(re.match(r"^transformer_blocks\.\d+\.norm1\.linear\.", k) for k in state)


def diffusers_to_dit(state: Mapping[str, Tensor], input_size: int | None) -> dict[str, Tensor]:
    """A diffusers ``DiTTransformer2DModel`` state dict in the DiT reference layout.

    Args:
        state: the diffusers weights.
        input_size: the latent side (diffusers' ``sample_size``), for the position table.

    Raises:
        ValueError: one line, if a block's embedders differ from block 0's (the DiT layout has
            one), a key is not part of a DiT, or the input size is unknown.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        m = re.match(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            i, name, kind = int(m.group(1)), m.group(2), m.group(3)
            if name in _EMB:
                if i == 0:
                    out[f"{_EMB[name]}.{kind}"] = value
                elif not torch.equal(value, state[f"transformer_blocks.0.{name}.{kind}"]):
                    raise ValueError(f"block {i}'s {name} differs from block 0's: the DiT layout has one timestep/label "
                                     f"embedder, so these weights cannot be converted exactly")
            elif name in _BLOCK:
                out[f"blocks.{i}.{_BLOCK[name]}.{kind}"] = value
            elif (q := re.match(r"^attn1\.to_([qkv])$", name)):
                qkv.setdefault((i, kind), {})[q.group(1)] = value
            else:
                unknown.append(key)
            continue
        m = re.match(r"^(.+)\.(weight|bias)$", key)
        if m and m.group(1) in _TOP:
            out[f"{_TOP[m.group(1)]}.{m.group(2)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a diffusers DiTTransformer2DModel: unexpected key(s) {', '.join(unknown[:4])}")
    for (i, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"block {i}: attn1.to_q/to_k/to_v {kind} incomplete (found {', '.join(sorted(parts))})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if input_size is None:
        raise ValueError("the input size of diffusers DiT weights is not in the tensors: load the model folder "
                         "(config.json has sample_size) or pass input_size=")
    hidden, _, patch, _ = out["x_embedder.proj.weight"].shape
    out["pos_embed"] = sincos_2d(hidden, input_size // patch).float()[None]
    return out


def is_diffusers_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a diffusers model folder (weights ``diffusion_pytorch_model*``, any
    variant or format) or a diffusers pipeline folder (``model_index.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return (folder / DIFFUSERS_PIPELINE_INDEX).is_file() or any(
        p.name.startswith("diffusion_pytorch_model") for p in folder.iterdir())


def diffusers_weights_file(folder: str | Path) -> Path:
    """The safetensors weights file of a diffusers model folder: ``diffusion_pytorch_model.safetensors``,
    else its only variant (``diffusion_pytorch_model.fp16.safetensors``, as
    ``save_pretrained(variant="fp16")`` writes it).

    Raises:
        ValueError: one line saying what the folder holds instead and what to pass: a pipeline
            folder (its ``transformer/`` subfolder), several variants, sharded or pickled
            (``.bin``) weights, or no weights at all.
    """
    folder = Path(folder)
    main = folder / DIFFUSERS_WEIGHTS
    if main.is_file():
        return main
    if (folder / DIFFUSERS_PIPELINE_INDEX).is_file():
        sub = folder / "transformer"
        vae = f" --vae {folder / 'vae'}" if (folder / "vae").is_dir() else ""
        if (folder / "training_recipe.yaml").is_file():  # exported by the toolkit: its recipe samples it as trained
            vae += f" --recipe {folder / 'training_recipe.yaml'}"
        vae = f" (to sample, add{vae})" if vae else ""
        if sub.is_dir():
            raise ValueError(f"{folder} is a diffusers pipeline folder ({DIFFUSERS_PIPELINE_INDEX}), not a model folder: "
                             f"pass its transformer folder {sub}{vae}")
        raise ValueError(f"{folder} is a diffusers pipeline folder ({DIFFUSERS_PIPELINE_INDEX}) without a transformer/ "
                         f"subfolder: pass the folder of its DiTTransformer2DModel")
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    variants = [n for n in names if _VARIANT.match(n)]
    if len(variants) == 1:
        return folder / variants[0]
    if variants:
        raise ValueError(f"{folder} holds several variant weights files ({', '.join(variants)}) and no {DIFFUSERS_WEIGHTS}: "
                         f"copy the folder with only the variant to use")
    if any(n.startswith("diffusion_pytorch_model") and n.endswith(".index.json") for n in names):
        raise ValueError(f"{folder} holds sharded diffusers weights ({DIFFUSERS_WEIGHTS.replace('.safetensors', '')}-*-of-*), "
                         f"which the toolkit does not read: save the model again as one file with diffusers "
                         f"(DiTTransformer2DModel.from_pretrained(folder).save_pretrained(out, max_shard_size='100GB'))")
    pickled = [n for n in names if n.startswith("diffusion_pytorch_model") and n.endswith(".bin")]
    if pickled:
        raise ValueError(f"{folder} holds {pickled[0]} (pickled weights), which the toolkit does not read: save the "
                         f"model again as safetensors with diffusers (DiTTransformer2DModel.from_pretrained(folder)"
                         f".save_pretrained(out))")
    raise ValueError(f"{folder} is not a diffusers model folder: it needs {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}")


def read_diffusers_dit(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights of a diffusers ``DiTTransformer2DModel`` folder in the DiT layout and the
    toolkit options its ``config.json`` gives (input size, heads).

    The weights are ``diffusion_pytorch_model.safetensors`` or, without it, the folder's only
    variant file (``diffusion_pytorch_model.fp16.safetensors``), read in float32 (exactly the
    stored values, as diffusers loads it with ``torch_dtype=torch.float32``)."""
    from diffit_toolkit.backbones.pretrained import read_safetensors

    folder = Path(folder)
    weights = diffusers_weights_file(folder)
    config_path = folder / DIFFUSERS_CONFIG
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a diffusers model folder: it has {weights.name} but no {DIFFUSERS_CONFIG}")
    config = read_json_object(config_path, "a model config")
    if config.get("_class_name") not in (None, "DiTTransformer2DModel"):
        raise ValueError(f"{config_path} describes a {config['_class_name']}, not a DiTTransformer2DModel")
    options = diffusers_options(config, str(config_path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_safetensors(weights).items()}
    return diffusers_to_dit(state, options["input_size"]), options


#: The MLP activation of the toolkit's DiT, in diffusers' words (``GELU(approximate="tanh")``).
DIFFUSERS_ACTIVATION = "gelu-approximate"
_ACTIVATIONS = {"gelu": "exact erf GELU", "geglu": "gated GELU", "geglu-approximate": "gated sigmoid GELU",
                "swiglu": "gated SiLU", "linear-silu": "SiLU"}


def diffusers_options(config: Mapping[str, Any], source: str = "the diffusers config") -> dict[str, Any]:
    """Toolkit ``dit`` options from a diffusers ``DiTTransformer2DModel`` config.

    Raises:
        ValueError: one line if the config asks for a forward the toolkit's DiT does not compute
            (an MLP activation other than the tanh GELU, a norm other than ``ada_norm_zero``).
    """
    activation = config.get("activation_fn", DIFFUSERS_ACTIVATION)
    if activation != DIFFUSERS_ACTIVATION:
        kind = f" ({_ACTIVATIONS[activation]})" if activation in _ACTIVATIONS else ""
        raise ValueError(f"{source} has activation_fn '{activation}'{kind}: the toolkit's DiT uses the tanh-approximated "
                         f"GELU ('{DIFFUSERS_ACTIVATION}'), so the converted model would compute another function; only "
                         f"models with activation_fn '{DIFFUSERS_ACTIVATION}' (the DiT default) can be converted: use "
                         f"this one with diffusers")
    norm = config.get("norm_type", "ada_norm_zero")
    if norm != "ada_norm_zero":
        raise ValueError(f"{source} has norm_type '{norm}': only DiT's 'ada_norm_zero' can be converted")
    return {
        "input_size": int(config.get("sample_size", 32)),
        "num_heads": int(config.get("num_attention_heads", 16)),
        "time_feature_options": dict(DIFFUSERS_TIME_OPTIONS),
    }


def to_diffusers_dit(model: LatentDiffiT) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state dict)`` of the diffusers ``DiTTransformer2DModel`` equal to ``model``.

    Raises:
        ValueError: if ``model`` is not a class-conditional DiT (``adaln_zero`` blocks, ``adaln``
            final layer, no relative bias, positional time features with ``freq_shift: 1``).
    """
    cfg = model.config
    problems = []
    if cfg.get("mechanism") != "adaln_zero" or cfg.get("final_layer") != "adaln" or cfg.get("rel_pos_bias"):
        problems.append("only DiT models (mechanism adaln_zero, final_layer adaln, no rel_pos_bias) have a diffusers class")
    if not cfg.get("num_classes"):
        problems.append("diffusers' DiT is class-conditional: the model needs num_classes > 0")
    if cfg.get("time_features", "positional") != "positional" or \
            float(cfg.get("time_feature_options", {}).get("freq_shift", 0.0)) != 1.0:
        problems.append("diffusers' DiT computes time features with downscale_freq_shift=1: train with "
                        "model.time_feature_options: {freq_shift: 1} to export to diffusers")
    if cfg.get("mlp_ratio", 4.0) != 4.0 or cfg.get("frequency_dim", 256) != 256:
        problems.append("diffusers' DiT has mlp_ratio 4 and 256 time frequencies")
    if problems:
        raise ValueError("cannot export to diffusers' DiTTransformer2DModel: " + "; ".join(problems))
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    inverse_top = {v: k for k, v in _TOP.items()}
    inverse_block = {v: k for k, v in _BLOCK.items()}
    inverse_emb = {v: k for k, v in _EMB.items()}
    depth = cfg["depth"]
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        m = re.match(r"^(.+)\.(weight|bias)$", key)
        if key == "pos_embed" or key.endswith("relative_position_index"):
            continue
        name, kind = m.group(1), m.group(2)
        if name in inverse_top:
            out[f"{inverse_top[name]}.{kind}"] = value
        elif name in inverse_emb:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{inverse_emb[name]}.{kind}"] = value.clone()
        elif (b := re.match(r"^blocks\.(\d+)\.(?:cond\.)?(.+)$", name)):
            i, rest = b.group(1), b.group(2)
            if rest == "attn.qkv":
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.attn1.to_{part}.{kind}"] = chunk.clone()
            elif rest in inverse_block:
                out[f"transformer_blocks.{i}.{inverse_block[rest]}.{kind}"] = value
            else:
                raise ValueError(f"cannot export {key} to diffusers' DiT")
        else:
            raise ValueError(f"cannot export {key} to diffusers' DiT")
    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": cfg["num_heads"],
        "attention_head_dim": cfg["hidden_size"] // cfg["num_heads"],
        "in_channels": cfg["in_channels"],
        "out_channels": model.out_channels,
        "num_layers": depth,
        "sample_size": cfg["input_size"],
        "patch_size": cfg["patch_size"],
        "num_embeds_ada_norm": cfg["num_classes"],
        "norm_eps": 1e-6,
        "norm_elementwise_affine": False,
        "attention_bias": True,
        "activation_fn": DIFFUSERS_ACTIVATION,
    }
    return config, out


def save_diffusers_dit(model: LatentDiffiT, folder: str | Path) -> Path:
    """Write ``model`` as a diffusers model folder (``DiTTransformer2DModel.from_pretrained`` reads it)."""
    from safetensors.torch import save_file

    config, state = to_diffusers_dit(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / DIFFUSERS_WEIGHTS))
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
