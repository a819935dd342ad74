"""Block forms: one registry entry names everything a norm choice means for a decoder (SPEC §2).

A *block form* is the value of ``ModelConfig.norm``. Its :class:`BlockForm` entry says which
per-token norm (a name in :data:`steadylm.nn.NORMS`) sits at the pre-attention and pre-FFN sites,
which arguments each site gets from the config, which block class assembles them (``"prenorm"``:
:class:`~steadylm.models.DecoderBlock`; ``"bhyt"``: :class:`~steadylm.models.BHyTBlock`, the
once-per-block statistics), the final norm it implies, and how many norm parameters a block has.
Adding a block form is one :func:`register_block_form` call (plus a block class if neither
existing one fits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from steadylm.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from steadylm.models.config import ModelConfig

__all__ = [
    "BLOCK_FORMS",
    "FINAL_NORM_CHOICES",
    "BlockForm",
    "get_block_form",
    "norm_kwargs",
    "norm_param_count",
    "register_block_form",
]

Site = Literal["attn", "ffn", "final"]


def norm_param_count(norm: str, dim: int) -> int:
    """Parameters of one per-token norm of width ``dim`` (closed form, independent of the modules)."""
    counts = {
        "rmsnorm": dim,
        "layernorm": 2 * dim,  # gain + bias
        "dyt": dim + 1,  # gain + α
        "bhyt": dim + 1,  # gain + λ
        "bhyt_star": dim + 1,
    }
    try:
        return counts[norm]
    except KeyError:
        raise ConfigError(f"no parameter count for norm {norm!r}; known: {sorted(counts)}") from None


def norm_kwargs(norm: str, config: ModelConfig, site: Site) -> dict[str, Any]:
    """Constructor arguments of the per-token norm ``norm`` at ``site`` of a model built from ``config``.

    DyT: α0 = ``dyt_alpha_attn`` before attention, ``dyt_alpha_other`` elsewhere (LLM recipe).
    BHyT: λ0 = ``bhyt_lambda_attn`` before attention, ``bhyt_lambda_ffn`` elsewhere, κ, ε.
    """
    if norm in ("rmsnorm", "layernorm"):
        return {"eps": config.norm_eps}
    if norm == "dyt":
        return {"alpha_init": config.dyt_alpha_attn if site == "attn" else config.dyt_alpha_other}
    if norm in ("bhyt", "bhyt_star"):
        lam = config.bhyt_lambda_attn if site == "attn" else config.bhyt_lambda_ffn
        return {"lam_init": lam, "kappa": config.bhyt_kappa, "eps": config.norm_eps}
    raise ConfigError(f"no site arguments for norm {norm!r}")


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

    def site_kwargs(self, config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
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

#: Norms allowed after the last block.
FINAL_NORM_CHOICES: tuple[str, ...] = ("rmsnorm", "layernorm", "dyt", "bhyt_star")


def register_block_form(form: BlockForm) -> BlockForm:
    """Add a block form to :data:`BLOCK_FORMS`."""
    if form.block not in ("prenorm", "bhyt"):
        raise ConfigError(f"BlockForm.block must be 'prenorm' or 'bhyt', got {form.block!r}")
    if form.final_norm not in FINAL_NORM_CHOICES:
        raise ConfigError(f"BlockForm.final_norm must be one of {list(FINAL_NORM_CHOICES)}, got {form.final_norm!r}")
    BLOCK_FORMS[form.name] = form
    return form


def get_block_form(name: str) -> BlockForm:
    """The registered form ``name``; unknown names raise ``ConfigError`` listing the known ones."""
    try:
        return BLOCK_FORMS[name]
    except KeyError:
        raise ConfigError(f"ModelConfig.norm must be one of {list(BLOCK_FORMS)}, got {name!r}") from None


register_block_form(BlockForm("rmsnorm", "rmsnorm"))
register_block_form(BlockForm("layernorm", "layernorm", final_norm="layernorm"))
register_block_form(BlockForm("dyt", "dyt", final_norm="dyt", embed_scale=True))
# BHyT's published pre-training runs keep an RMSNorm at the end (SPEC §2.5).
register_block_form(BlockForm("bhyt", "bhyt", block="bhyt"))
register_block_form(BlockForm("bhyt_star", "bhyt_star", block="bhyt", exact=True))
register_block_form(BlockForm("lns", "rmsnorm", layer_scale=True))
register_block_form(BlockForm("peri_ln", "rmsnorm", post_norms=True))
