"""Block forms: one registry entry names everything a norm choice means for a decoder (SPEC §2).

A *block form* is the value of ``ModelConfig.norm``. Its :class:`BlockForm` entry says which
per-token norm (a name in :data:`steadylm.nn.NORMS`) sits at the pre-attention and pre-FFN sites,
which arguments each site gets from the config, which block class assembles them (``"prenorm"``:
:class:`~steadylm.models.DecoderBlock`; ``"bhyt"``: :class:`~steadylm.models.BHyTBlock`, the
once-per-block statistics), the final norm it implies, and how many norm parameters a block has.
Adding a block form is one :func:`register_block_form` call (plus a block class if neither
existing one fits); a norm registered with :func:`steadylm.nn.register_norm` alone is already the
pre-norm form of its name. What a norm needs at each site and its parameter count come from its
:class:`~steadylm.nn.NormSpec`; nothing here names a norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from steadylm.errors import ConfigError, check_choice
from steadylm.nn.norms import NORM_SPECS, NORMS, Site, get_norm_spec

__all__ = [
    "BLOCK_FORMS",
    "FINAL_NORM_CHOICES",
    "BlockForm",
    "block_form_names",
    "final_norm_names",
    "get_block_form",
    "norm_kwargs",
    "norm_param_count",
    "register_block_form",
]


def norm_param_count(norm: str, dim: int) -> int:
    """Parameters of one per-token norm of width ``dim`` (its :class:`~steadylm.nn.NormSpec`)."""
    return get_norm_spec(norm).param_count(dim)


def norm_kwargs(norm: str, config: Any, site: Site) -> dict[str, Any]:
    """Constructor arguments of the per-token norm ``norm`` at ``site`` of a model built from
    ``config`` (a ``ModelConfig``), as its registration says (:func:`steadylm.nn.register_norm`)."""
    return get_norm_spec(norm).site_kwargs(config, site)


@dataclass(frozen=True)
class BlockForm:
    """One value of ``ModelConfig.norm``.

    Attributes:
        name: the config value.
        norm: per-token norm (a :data:`steadylm.nn.NORMS` key) at both pre-norm sites.
        block: ``"prenorm"`` (:class:`DecoderBlock`) or ``"bhyt"`` (:class:`BHyTBlock`).
        final_norm: the norm after the last block when ``ModelConfig.final_norm`` is None.
        post_norms: also normalise each sublayer's output (Peri-LN).
        layer_scale: multiply each pre-norm output by ``1/√ℓ`` (LayerNorm-Scaling).
        exact: for the ``"bhyt"`` block: exact statistics at both sites (BHyT*).
        embed_scale: a learnable scalar on the embedding output, initialised to √d (DyT recipe).
    """

    name: str
    norm: str
    block: Literal["prenorm", "bhyt"] = "prenorm"
    final_norm: str = "rmsnorm"
    post_norms: bool = False
    layer_scale: bool = False
    exact: bool = False
    embed_scale: bool = False

    def site_kwargs(self, config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Arguments of the (pre-attention, pre-FFN) norms."""
        return norm_kwargs(self.norm, config, "attn"), norm_kwargs(self.norm, config, "ffn")

    @property
    def norms_per_block(self) -> int:
        return 4 if self.post_norms else 2

    def block_param_count(self, dim: int) -> int:
        """Norm parameters of one block (post-norms are RMSNorm, as Peri-LN uses)."""
        pre = 2 * norm_param_count(self.norm, dim)
        return pre + (2 * norm_param_count("rmsnorm", dim) if self.post_norms else 0)


#: name -> :class:`BlockForm`; ``ModelConfig.norm`` must be one of these.
BLOCK_FORMS: dict[str, BlockForm] = {}

#: Built-in norms allowed after the last block (``bhyt`` needs the block's statistics; its
#: per-module form is ``bhyt_star``). Norms registered by plug-ins are allowed too
#: (:func:`final_norm_names`).
FINAL_NORM_CHOICES: tuple[str, ...] = ("rmsnorm", "layernorm", "dyt", "bhyt_star")
_BUILTIN_NORMS: frozenset[str] = frozenset(NORMS)


def final_norm_names() -> tuple[str, ...]:
    """Norms allowed after the last block: the built-in choices, then norms registered since."""
    return FINAL_NORM_CHOICES + tuple(n for n in NORM_SPECS if n not in _BUILTIN_NORMS)


def register_block_form(form: BlockForm) -> BlockForm:
    """Add a block form to :data:`BLOCK_FORMS`."""
    check_choice("BlockForm.block", form.block, ("prenorm", "bhyt"))
    check_choice("BlockForm.final_norm", form.final_norm, final_norm_names())
    get_norm_spec(form.norm)
    BLOCK_FORMS[form.name] = form
    return form


def block_form_names() -> tuple[str, ...]:
    """Every value ``ModelConfig.norm`` may take: the registered block forms, then each norm
    registered without a form of its own (a pre-norm block with it at both sites)."""
    return tuple(BLOCK_FORMS) + tuple(n for n in NORM_SPECS if n not in BLOCK_FORMS)


def get_block_form(name: str) -> BlockForm:
    """The form ``name``: a registered one, or the pre-norm form of a norm registered with
    :func:`steadylm.nn.register_norm` alone. Unknown names raise ``ConfigError`` listing the known ones."""
    form = BLOCK_FORMS.get(name)
    if form is None:  # a registered norm's pre-norm form, or no form at all
        check_choice("ModelConfig.norm", name, block_form_names())
        form = BlockForm(name, name)
    return form


register_block_form(BlockForm("rmsnorm", "rmsnorm"))
register_block_form(BlockForm("layernorm", "layernorm", final_norm="layernorm"))
register_block_form(BlockForm("dyt", "dyt", final_norm="dyt", embed_scale=True))
# BHyT's published pre-training runs keep an RMSNorm at the end (SPEC §2.5).
register_block_form(BlockForm("bhyt", "bhyt", block="bhyt"))
register_block_form(BlockForm("bhyt_star", "bhyt_star", block="bhyt", exact=True))
register_block_form(BlockForm("lns", "rmsnorm", layer_scale=True))
register_block_form(BlockForm("peri_ln", "rmsnorm", post_norms=True))
