"""OCP Microscaling (MX) block formats: what an MX format *is* (no torch kernels).

An MX format stores ``block_size`` (32 in OCP MX v1.0) consecutive elements in a narrow element
format sharing one power-of-two scale in E8M0 (``float8_e8m0fnu``). This module is the one
registry of MX names; the kernels are :func:`mixprec.mx_quantize`, :func:`mixprec.mx_encode` and
:func:`mixprec.mx_decode`, and :class:`mixprec.Policy` takes the same names.

**Decision (short names).** A bare size names the variant with more mantissa bits:
``mxfp8`` is ``mxfp8_e4m3``, ``mxfp6`` is ``mxfp6_e2m3``, ``mxfp4`` is ``mxfp4_e2m1`` (the only
fp4). The shared scale already supplies the block's range, so an element spends its bits best
on precision; ``mxfp8`` -> e4m3 is also what ``Policy`` accepted before the registries were
merged, and e4m3 is the forward-operand format of fp8 training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixprec.formats.float_format import (
    ALIASES,
    FORMATS,
    FloatFormat,
    close_matches,
    did_you_mean,
    find_format,
    get_format,
    suggest_format_names,
)


@dataclass(frozen=True)
class MXFormat:
    """An OCP MX format: an element format sharing one E8M0 scale per block.

    Attributes:
        name: the spec's name (``"mxfp8_e4m3"``, ...).
        element: the element :class:`~mixprec.formats.FloatFormat`.
        block_size: the spec's block size (32 for every concrete MX format of v1.0).
    """

    name: str
    element: FloatFormat
    block_size: int = 32

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest binade (the spec's ``emax_elem``)."""
        return self.element.emax

    @property
    def scale_format(self) -> FloatFormat:
        """Format of the shared block scales, E8M0 (``float8_e8m0fnu``): exponents -127..127
        (its ``emin``, ``emax``) in codes ``exponent + bias`` (bias 127), NaN code ``0xFF``."""
        return FORMATS["float8_e8m0fnu"]

    @property
    def bits_per_element(self) -> float:
        """Storage cost per element, the shared scale included (e.g. 8.25 for MXFP8)."""
        return self.element.bits + 8 / self.block_size

    def __str__(self) -> str:
        return self.name


#: The concrete MX formats of OCP MX v1.0 (MXINT8 is not a float format and is not provided).
MX_FORMATS: dict[str, MXFormat] = {
    m.name: m
    for m in (
        MXFormat("mxfp8_e4m3", FORMATS["float8_e4m3fn"]),
        MXFormat("mxfp8_e5m2", FORMATS["float8_e5m2"]),
        MXFormat("mxfp6_e3m2", FORMATS["float6_e3m2fn"]),
        MXFormat("mxfp6_e2m3", FORMATS["float6_e2m3fn"]),
        MXFormat("mxfp4_e2m1", FORMATS["float4_e2m1fn"]),
    )
}

#: Short MX names (see the module docstring for the choice of variant).
MX_ALIASES: dict[str, str] = {"mxfp8": "mxfp8_e4m3", "mxfp6": "mxfp6_e2m3", "mxfp4": "mxfp4_e2m1"}

#: The rules for a block's shared exponent (:mod:`mixprec.quantization.blocks`), the spec's first.
SCALE_ROUNDINGS: tuple[str, ...] = ("floor", "rceil", "ceil", "even")


def check_scale_rounding(scale_rounding: object) -> str:
    """``scale_rounding`` if it is one of :data:`SCALE_ROUNDINGS`, else a ValueError/TypeError."""
    if not isinstance(scale_rounding, str):
        raise TypeError(
            f"scale_rounding must be a str, one of {SCALE_ROUNDINGS}, got "
            f"{type(scale_rounding).__name__}: {scale_rounding!r}"
        )
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}, got {scale_rounding!r}")
    return scale_rounding


_BY_ELEMENT: dict[str, MXFormat] = {m.element.name: m for m in MX_FORMATS.values()}
_MX_HINT = f"MX formats: {', '.join(MX_FORMATS)} (or their element formats)"


def mx_format_names() -> list[str]:
    """Every MX name: canonical names, then aliases."""
    return [*MX_FORMATS, *MX_ALIASES]


def find_mx_format(name: str) -> MXFormat | None:
    """The MX format of an MX name or alias (case and surrounding blanks ignored), else None."""
    key = name.strip().lower()
    return MX_FORMATS.get(MX_ALIASES.get(key, key))


def mx_suggestions(key: str, *, elements: bool = True) -> list[str]:
    """MX names close to ``key``: those extending it by ``_...``, else difflib's closest.

    With ``elements`` the element formats' names and aliases are candidates too.
    """
    names = mx_format_names()
    prefixed = [n for n in names if n.startswith(key + "_")]
    if prefixed:
        return prefixed[:4]
    if elements:
        names += [*_BY_ELEMENT, *(a for a, n in ALIASES.items() if n in _BY_ELEMENT)]
    return close_matches(key, names)


def not_an_element_message(shown: str, key: str) -> str:
    """Why :func:`~mixprec.formats.get_format` refuses an ``mx...`` name, with a suggestion."""
    mx = find_mx_format(key)
    where = "mx_quantize, mx_encode, mx_decode and Policy take MX formats"
    if mx is not None:
        return (
            f"{shown!r} is an MX block format, not an element format ({where}); its element "
            f"format is {mx.element.name!r}"
        )
    hint = did_you_mean(mx_suggestions(key, elements=False))
    return f"unknown format {shown!r}{hint} ({where})"


def get_mx_format(name: str | MXFormat | FloatFormat) -> MXFormat:
    """The :class:`MXFormat` for an MX name or alias (``"mxfp8_e4m3"``, ``"mxfp8"``) or an
    element format.

    Element formats may be given by any name or alias :func:`~mixprec.formats.get_format`
    accepts (``"float8_e4m3fn"``, ``"e4m3"``, ``"fp4"``, ...), but only the five element formats
    of the spec are MX formats; anything else raises ``ValueError`` naming the bad value, the
    closest valid names and the MX formats. ``TypeError`` for other types.
    """
    if isinstance(name, MXFormat):
        return name
    if isinstance(name, str):
        mx = find_mx_format(name)
        if mx is not None:
            return mx
        key = name.strip().lower()
        try:
            elem = get_format(key)
        except ValueError:
            hint = did_you_mean(mx_suggestions(key))
            raise ValueError(f"unknown MX format {name!r}{hint} ({_MX_HINT})") from None
    elif isinstance(name, FloatFormat):
        elem = name
    else:
        raise TypeError(
            f"expected an MX format name, MXFormat or FloatFormat, got {type(name).__name__}: "
            f"{name!r}"
        )
    mx = _BY_ELEMENT.get(elem.name)
    if mx is None:
        raise ValueError(f"{elem.name} is not an MX element format ({_MX_HINT})")
    return mx


_ANY_HINT = (
    "`mixprec formats` lists the element formats (bfloat16, float8_e4m3fn, ...); eXmY is an "
    f"IEEE-style custom format; MX block formats: {', '.join(MX_FORMATS)}"
)


def get_element_or_mx_format(name: str) -> FloatFormat | MXFormat:
    """An element format or an MX format, by any name either registry accepts.

    MX names and aliases give the :class:`MXFormat`; every other name goes to
    :func:`~mixprec.formats.get_format`. Unknown names raise a short ``ValueError`` with the
    closest names of both registries (what :class:`mixprec.Policy` accepts).
    """
    mx = find_mx_format(name)
    if mx is not None:
        return mx
    found = find_format(name)  # ValueError for an eXmY out of range: its message says why
    if found is not None:
        return found
    key = name.strip().lower()
    suggestions = mx_suggestions(key) if key.startswith("mx") else suggest_format_names(key)
    raise ValueError(f"unknown format {name!r}{did_you_mean(suggestions)} ({_ANY_HINT})")
