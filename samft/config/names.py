"""The names the registries register, as torch-free tuples: what ``model.type``, ``model.attention`` and
``peft.method`` accept.

The registries check against these lists when they register (a name missing here is a developer error,
a RuntimeError at import), and ``tests/test_config_schema.py`` checks that the sets are equal, so the
config validates registry names without importing a registry (nor torch). The order is the one the
choices are listed in (error messages, ``samft info``).
"""

from __future__ import annotations

# model families (model.family): SAM 1 (ViT encoder) and SAM 2.1 (Hiera encoder)
FAMILIES = ("sam", "sam2")

# model/sam.py's size registry (sam_sizes)
SAM_TYPES = ("tiny", "vit_b", "vit_l", "vit_h")

# model/hiera.py's size registry (sam2_sizes): the four official SAM 2.1 sizes and a tiny random Hiera
SAM2_TYPES = ("tiny", "hiera_t", "hiera_s", "hiera_b+", "hiera_l")

# what model.type accepts, per family
FAMILY_TYPES = {"sam": SAM_TYPES, "sam2": SAM2_TYPES}

# model/attention's registry (attention_names): the fallback first, then the others sorted
ATTENTIONS = ("sdpa", "bra", "eager")

# peft/registry.py, in registration order (also the fields of samft.config.peft.PeftConfig)
PEFT_METHODS = ("adapter", "bitfit", "lora", "conv_lora", "decoder_only", "full", "hf", "sam_adapter", "ssf", "vpt")

# peft.hf.type: HF peft's methods that samft applies to the encoder's nn.Linear layers (samft/peft/hf.py says why
# the others are not offered)
HF_PEFT_TYPES = ("lora", "dora", "loha", "lokr", "oft", "boft", "ia3", "fourierft", "hra", "randlora")


def check_registered(kind: str, name: str, names: tuple[str, ...]) -> None:
    """Called by a registry when it registers ``name``: a RuntimeError unless the config lists it."""
    if name not in names:
        raise RuntimeError(f"{kind} {name!r} is registered but missing from samft/config/names.py "
                           f"({', '.join(names)}): add it there so that the config accepts it")
