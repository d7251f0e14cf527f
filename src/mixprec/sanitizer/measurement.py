"""Error measurement per op: real results against shadows, local error, findings (private).

For each result of a shadowed op the fast path (:meth:`Measurer._suspicious`, one fused pass,
:mod:`.passes`) decides whether any element could be a finding. Only then (the slow path, rare on
healthy code) the op runs a third time on the shadow inputs rounded to the real formats: the
*local* result, which separates the error this op introduced (Herbgrind's idea) from the error
it inherited, and flagged elements become findings:

* ``nan`` / ``inf``: produced from inputs without NaN or Inf (only the first op is reported,
  not everything downstream); ``overflow``: real result infinite where the shadow is finite;
* ``underflow``: a flagged element whose shadow is non-zero but below the format's smallest
  normal, and whose local result is zero or subnormal;
* ``cancellation``: a flagged add/sub (with ``bits_cancelled = log2(max|operand| / |result|)``);
  ``precision_loss``: any other flagged op;
* ``decision_flip``: integer / boolean results of float inputs that differ from the shadow's
  (argmax-like indices only where the chosen shadow values differ; comparisons; ``where``
  masks built from flipped comparisons).

For sums of products (sum, mean, mm, addmm, convolution, ...) the denominator of the relative
error is at least the element's sum of |terms|: a reduction that cancels is judged by what a
backward-stable evaluation can err by. The definitions are in :mod:`.tolerances`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch

from mixprec.formats import FloatFormat
from mixprec.frames import user_frame
from mixprec.quantization import quantize
from mixprec.sanitizer.findings import CAUSE_KINDS, FindingLog, Hit, Site, Stats
from mixprec.sanitizer.ops import OpInfo, RealCall
from mixprec.sanitizer.passes import Passes, pick
from mixprec.sanitizer.shadows import LOW, ShadowInputs, Shadows
from mixprec.sanitizer.terms import sums_of_terms, terms_lower_bound
from mixprec.sanitizer.tolerances import FmtInfo, bits_lost, make_fmt_info
from mixprec.trees import (
    leaves,
    map_pair_kwargs,
    map_pairs,
    tensors,
)

_TINY = 2.0**-1022  # smallest normal float64: keeps 0/0 out of the fast path
_AMP = 4.0  # re-check an op locally only if its error is > _AMP x the error it inherited
_PRECISION = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}

_NONFINITE_KINDS = ("nan", "inf", "overflow")  # the findings linked to a cause
_NONFINITE = "nonfinite"  # _suspicious: the result holds inf or NaN (always the slow path)
_AGREEING = "agreeing"  # ... each equal to its shadow, the rest within tolerance

Slow = tuple[int, torch.Tensor, torch.Tensor]  # (result position, real, shadow)


@dataclass(slots=True)
class ShadowedCall:
    """An op call being checked: the real call, its arguments' shadows, and where it ran."""

    info: OpInfo
    func: Any  # the op run on shadows: an in-place op's functional variant
    real: RealCall  # the user's call: real arguments
    sargs: list[Any]  # shadows of the positional arguments, taken before the real op ran
    skwargs: dict[str, Any]  # shadows of the keyword arguments
    inputs: ShadowInputs  # what the shadow lookup found (has_shadow, err)
    phase: str  # "forward" or "backward"
    site: Site

    @property
    def args(self) -> tuple[Any, ...]:
        return self.real.args

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.real.kwargs

    @property
    def has_shadow(self) -> bool:
        """Some input has a stored shadow (is not exact)."""
        return self.inputs.has_shadow

    @property
    def err(self) -> float:
        """The largest error bound among the inputs."""
        return self.inputs.err


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _example(r: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(real, shadow) of the first element of ``mask``."""
    idx = int(mask.reshape(-1).nonzero()[0, 0])
    return float(r.reshape(-1)[idx]), float(s.reshape(-1)[idx])


def _flip_hit(t: torch.Tensor, flips: int) -> Hit:
    return Hit("decision_flip", _dtype_name(t.dtype), flips, t.numel(), tuple(t.shape))


def _over_tol(
    x: torch.Tensor, s: torch.Tensor, den: torch.Tensor, valid: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(relative error, flagged elements, their count) of ``x`` against ``s``."""
    err = torch.sub(x, s).abs_().div_(den)
    flag = valid & (err > tol)
    return err, flag, int(flag.sum())


class _SlowPath:
    """What the slow path of one op call computes at most once, and only if needed."""

    def __init__(self, call: ShadowedCall, fmts: dict[torch.dtype, FmtInfo]) -> None:
        self.call = call
        self.fmts = fmts  # the real formats' tolerances (the measurer's)

    def _input_args(self) -> list[Any]:
        """The real positional arguments; mutated ones: their shadows (the old values)."""
        written = {w for w in self.call.info.written if isinstance(w, int)}
        return [
            s if i in written else a
            for i, (a, s) in enumerate(zip(self.call.args, self.call.sargs, strict=False))
        ]

    @cached_property
    def inputs_nonfinite(self) -> tuple[bool, bool]:
        """(any NaN, any Inf) among the inputs (mutated ones: their shadows, the old values)."""
        args = [*self._input_args(), *self.call.kwargs.values()]
        floats = [t for t in tensors(args) if t.is_floating_point() and t.numel()]
        has_nan = any(bool(torch.isnan(t).any()) for t in floats)
        has_inf = any(bool(torch.isinf(t).any()) for t in floats)
        return has_nan, has_inf

    def _reach(self, marked: Callable[[torch.Tensor], torch.Tensor]) -> list[Any] | None:
        """Which output elements depend on the ``marked`` input elements: the op run on probes
        (marked elements NaN, every other float element 1; NaN propagates through arithmetic,
        reductions and products alike), NaN where reached. One shadow-dtype op run."""
        call = self.call

        def probe(a: Any, s: Any) -> Any:
            if (
                isinstance(a, torch.Tensor)
                and a.is_floating_point()
                and isinstance(s, torch.Tensor)
            ):
                return torch.where(marked(a), math.nan, 1.0).to(s.dtype)
            return s

        args = map_pairs(probe, self._input_args(), call.sargs)
        kwargs = map_pair_kwargs(probe, call.kwargs, call.skwargs)
        try:
            return [
                torch.isnan(o) if isinstance(o, torch.Tensor) else o
                for o in leaves(call.func(*args, **kwargs))
            ]
        except Exception:
            return None

    @cached_property
    def _taints(self) -> tuple[list[Any] | None, list[Any] | None]:
        """(reached by a NaN input, reached by a NaN or Inf input) per output; None: no such
        input. Only ops with non-finite inputs pay for it (one or two probe runs)."""
        has_nan, has_inf = self.inputs_nonfinite
        nan_t = self._reach(torch.isnan) if has_nan else None
        any_t = self._reach(lambda t: ~torch.isfinite(t)) if has_inf else nan_t
        return nan_t, any_t

    def taint(self, i: int, r: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Result ``i``'s elements reached by a NaN input, and by any non-finite input (None:
        none). Where the probe fails every element counts as reached (the old, per-op rule)."""
        has_nan, has_inf = self.inputs_nonfinite
        out: list[torch.Tensor | None] = []
        for flag, probes in zip((has_nan, has_nan or has_inf), self._taints, strict=True):
            if not flag:
                out.append(None)
                continue
            t = probes[i] if probes is not None and i < len(probes) else None
            ok = isinstance(t, torch.Tensor) and t.shape == r.shape
            out.append(t if ok else torch.ones_like(r, dtype=torch.bool))
        return out[0], out[1]

    @cached_property
    def abs_outputs(self) -> list[Any] | None:
        """Each result's sum of |terms|, element by element (:func:`.terms.sums_of_terms`: the
        op on |shadow inputs|, or a fused backward's written-out sums). None if the
        op refuses."""
        return self._sums(None)

    @cached_property
    def abs_outputs32(self) -> list[Any] | None:
        """:attr:`abs_outputs` computed in float32 (narrowed shadows: a bound needs no more)."""
        return self._sums(torch.float32)

    def _sums(self, dtype: torch.dtype | None) -> list[Any] | None:
        call = self.call
        first = call.args[0] if call.args else None  # a fused backward's real gradient
        fi = self.fmts.get(first.dtype) if isinstance(first, torch.Tensor) else None
        return sums_of_terms(call.info.packet, call.func, call.sargs, call.skwargs, dtype, fi)

    def terms(self, i: int, s: torch.Tensor) -> torch.Tensor | None:
        """Result ``i``'s sum of |terms| element by element (:attr:`abs_outputs`), or None when
        the op refuses or it does not have the shape of the shadow ``s``."""
        return _result_like(self.abs_outputs, i, s)

    def terms_bound(self, i: int, s: torch.Tensor) -> torch.Tensor | None:
        """A lower bound of :meth:`terms` at float32 speed (:func:`terms_lower_bound`), else
        :meth:`terms` itself. Cost: the op in float32, one float32 reduction and a sync."""
        t = terms_lower_bound(_result_like(self.abs_outputs32, i, s))
        return self.terms(i, s) if t is None else t


def _result_like(outs: list[Any] | None, i: int, s: torch.Tensor) -> torch.Tensor | None:
    t = outs[i] if outs is not None and i < len(outs) else None
    return t if isinstance(t, torch.Tensor) and t.shape == s.shape else None


@dataclass(frozen=True)
class _Result:
    """One suspicious result on the slow path: real, shadow and local values, real format."""

    i: int  # position among the op's results
    r: torch.Tensor
    s: torch.Tensor
    loc: torch.Tensor
    fi: FmtInfo

    def all_bits_lost(self, kind: str, mask: torch.Tensor, n: int) -> Hit:
        """A nan / inf / overflow hit: every significand bit is lost."""
        r = self.r
        return Hit(
            kind,
            self.fi.name,
            count=n,
            elements=r.numel(),
            shape=tuple(r.shape),
            bits=float(self.fi.mantissa_bits + 1),
            rel=math.inf,
            example=_example(r, self.s, mask),
        )

    def flagged(
        self,
        kind: str,
        mask: torch.Tensor,
        n: int,
        errs: tuple[torch.Tensor, torch.Tensor],
        cancelled: float | None = None,
    ) -> Hit:
        """A hit of flagged elements: the worst local error, the worst total error (``errs``:
        local and total relative errors)."""
        r, fi = self.r, self.fi
        le = torch.where(mask, errs[0], -1.0).reshape(-1)
        idx = int(le.argmax())
        rel = float(le[idx])
        prop = float(torch.where(mask, errs[1], -1.0).amax())
        return Hit(
            kind,
            fi.name,
            count=n,
            elements=r.numel(),
            shape=tuple(r.shape),
            bits=bits_lost(rel, fi),
            rel=rel,
            propagated=bits_lost(prop, fi),
            cancelled=cancelled,
            example=(float(r.reshape(-1)[idx]), float(self.s.reshape(-1)[idx])),
        )


def _cancelled_bits(call: ShadowedCall, s: torch.Tensor, mask: torch.Tensor) -> float | None:
    """log2(max |operand| / |result|) at the flagged elements, on shadow values."""
    try:
        args, sargs = call.args, call.sargs
        x, y = sargs[0], sargs[1] if len(sargs) > 1 else None
        alpha = call.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        ops = []
        for v, scale in ((x, 1.0), (y, float(alpha))):
            if isinstance(v, torch.Tensor):
                ops.append((v * scale).abs() if scale != 1.0 else v.abs())
            elif isinstance(v, (int, float)):
                ops.append(torch.tensor(abs(float(v) * scale), dtype=s.dtype, device=s.device))
        big = torch.maximum(*ops) if len(ops) == 2 else ops[0]
        ratio = big.expand_as(s) / s.abs()
        v = float(torch.where(mask, ratio, 0.0).amax())
        if v <= 1.0:
            return 0.0
        return math.log2(v) if math.isfinite(v) else float("inf")
    except Exception:
        return None


def _new_nonfinite(extra: _SlowPath, i: int, r: torch.Tensor) -> bool:
    """Does result ``i`` hold a NaN not reached by a NaN input, or an inf not reached by any
    non-finite input (a finding, for the slow path)? The reach probes of :class:`_SlowPath`:
    one or two shadow-dtype runs. (The -inf of an attention mask added to the scores is
    inherited: no slow path.)"""
    nan_t, any_t = extra.taint(i, r)
    if any_t is None:  # no non-finite input: every inf / NaN is new
        return True
    nan_r = torch.isnan(r)
    if nan_t is not None:
        nan_r &= ~nan_t
    return bool(nan_r.any()) or bool((torch.isinf(r) & ~any_t).any())


def _worse(call: ShadowedCall, e_out: float) -> bool:
    """Did this op make the error worse: more than ``_AMP`` times the error it inherited? Only
    then is a result worth the local re-run. (Non-finite inherited errors: only non-finite
    results are news, and those take the slow path whatever their error.)"""
    return e_out > _AMP * call.err and math.isfinite(call.err)


def _sum_of_terms(call: ShadowedCall, i: int) -> bool:
    """Is result ``i`` a sum of products of the inputs (judged against the sum of |terms|)?"""
    return call.info.multilinear or i in call.info.sum_results


def _fine_against_terms(
    extra: _SlowPath, i: int, r: torch.Tensor, s: torch.Tensor, fi: FmtInfo
) -> bool:
    """The fast test of :meth:`Measurer._suspicious` for a sum of products, with each element's
    sum of |terms| in the denominator (as the slow path judges it): True when nothing can be
    flagged. A sum that cancels to ~0 (a layer norm's row mean, a bias gradient) then needs no
    local re-run. Cost: the op once more on |shadow inputs|, in float32
    (:meth:`_SlowPath.terms_bound`), and four float64 passes."""
    terms = extra.terms_bound(i, s)
    if terms is None:
        return False
    a = s.abs()
    floor = max(float(a.amax()) * fi.floor, _TINY)
    den = torch.maximum(a, terms.abs()).clamp_(min=floor)  # float32 bounds promote
    return float(torch.sub(r, s).abs_().div_(den).amax()) <= fi.tol


class Measurer:
    """Compares real results with their shadows, stores the shadows, records findings."""

    def __init__(
        self,
        shadows: Shadows,
        fmts: dict[torch.dtype, FmtInfo],
        log: FindingLog,
        stats: Stats,
        threshold_bits: float | None,
    ) -> None:
        self.shadows = shadows
        self.fmts = fmts
        self.log = log
        self.stats = stats
        self.threshold_bits = threshold_bits
        # True while we round shadows with mixprec.quantize ourselves (local inputs in an
        # emulated format): the quantize observer must not take that for the user's rounding
        self.rounding = False
        self._new_cause: str | None = None  # label of a range finding of the op being checked

    def measure(self, call: ShadowedCall, reals: list[Any], souts: list[Any]) -> None:
        """Check the results of a rounding op; the slow path for the suspicious ones."""
        slow, extra = self._fast_path(call, reals, souts)
        if slow:
            self._slow_path(call, slow, extra or _SlowPath(call, self.fmts))

    # -- fast path -----------------------------------------------------------------------------
    def _fast_path(
        self, call: ShadowedCall, reals: list[Any], souts: list[Any]
    ) -> tuple[list[Slow], _SlowPath | None]:
        """Store each result's shadow; return the results worth the slow path, and what the
        checks computed for them (None: nothing, the usual case)."""
        shadowable, sdt = self.shadows.shadowable, self.shadows.dtype
        slow: list[Slow] = []
        extra: _SlowPath | None = None  # made on the first check that needs it
        for i, (r, s) in enumerate(zip(reals, souts, strict=False)):
            if not isinstance(r, torch.Tensor) or not isinstance(s, torch.Tensor):
                continue
            if r.dtype in shadowable:
                if r.numel() == 0:
                    continue
                s = s if s.dtype == sdt else s.to(sdt)
                origin = (call.info.name, call.phase, call.site)
                if i in call.info.internal_results:  # carried to the backward, not judged
                    self.shadows.store.put(r, s, 0.0, None, call.inputs.cause, origin)
                    continue
                fi = self.fmts[r.dtype]
                suspicious, e_out, smax = self._suspicious(r, s, fi)
                self.shadows.store.put(r, s, e_out, smax, call.inputs.cause, origin)
                if not suspicious:
                    continue
                if suspicious is _AGREEING:  # new inf / NaN only: the slow path, always
                    extra = extra or _SlowPath(call, self.fmts)
                    if _new_nonfinite(extra, i, r):
                        slow.append((i, r, s))
                    continue
                if suspicious is _NONFINITE:
                    slow.append((i, r, s))  # judged element by element there
                    continue
                # an error goes to the slow path where this op made it worse, unless the terms
                # bound of a sum of products, which costs the op once more and runs only where
                # it can decide, clears it
                if not _worse(call, e_out):
                    continue
                if _sum_of_terms(call, i):
                    extra = extra or _SlowPath(call, self.fmts)
                    if _fine_against_terms(extra, i, r, s, fi):
                        continue
                slow.append((i, r, s))
            elif call.has_shadow and not r.is_floating_point() and not r.is_complex():
                self._decision(call, r, s)
        return slow, extra

    @staticmethod
    def _suspicious(r: torch.Tensor, s: torch.Tensor, fi: FmtInfo) -> tuple[Any, float, float]:
        """Could any element of ``r`` be a finding? Cheap sufficient test first.

        Returns (suspicious, e, smax) with ``e = max|r - s| / (floor * max|s|)`` over the
        elements where real and shadow differ, the error bound kept with the shadow (inf where a
        real non-finite value has a different shadow), and an upper bound of ``max|s|`` over the
        finite shadows (kept for the gradient histogram). ``suspicious`` is ``_NONFINITE`` when
        ``r`` holds inf or NaN (the slow path decides, element by element, which are new).

        Cheap (one fused pass in the C kernel, or four float32 passes and one sync in torch,
        :mod:`.passes`): if ``max|r - s| <= tol * floor * max|s|`` then every element satisfies
        ``|r_i - s_i| <= tol * max(|s_i|, floor * max|s|)``, the flagging criterion, so nothing
        can be flagged. Computing the difference in float32 against the shadow rounded to
        float32 adds at most half a float32 ulp, far below any threshold. Otherwise the
        elementwise test decides: in float32 with a margin where that is conclusive, else in
        float64 (one more pass each).
        """
        ps = pick(r, s)
        dm, sm, bad, nonzero = ps.max_pass()
        if bad:
            return Measurer._suspicious_nonfinite(ps, fi)
        smax = sm * (1.0 + 2.0**-23)  # sm is max|s| rounded to nearest: bound it from above
        if sm > 0:
            e = dm / (fi.floor * sm)
            if e <= fi.tol:
                return False, e, smax
            if Measurer._fine_in_float32(ps, sm * fi.floor, fi.tol):
                return False, e, smax
        else:
            e = 0.0 if dm == 0 else math.inf
        if not math.isfinite(e):
            e = math.inf
        if dm == 0 and sm == 0 and not nonzero:
            return False, 0.0, 0.0  # exactly zero
        rmax = ps.ratio64(fi.floor, _TINY)
        return not rmax <= fi.tol, e, smax

    @staticmethod
    def _fine_in_float32(ps: Passes, floor: float, tol: float) -> bool:
        """The elementwise test of :meth:`_suspicious` in float32: True when every element
        passes with a margin that covers the float32 rounding of ``s`` and of the test (each
        element's ratio is off by at most a few 2^-24, so 2^-21 covers it; float32 results'
        default tolerance is 2^-12.5). One float32 pass instead of a float64 one; False: decide
        in float64."""
        if not (floor >= 2.0**-100 and tol > 2.0**-19):  # normal float32 clamp, a real margin
            return False
        return ps.ratio32(floor) <= tol - 2.0**-21

    @staticmethod
    def _suspicious_nonfinite(ps: Passes, fi: FmtInfo) -> tuple[Any, float, float]:
        """:meth:`_suspicious` where ``r`` or ``s`` holds inf or NaN: elements whose real and
        shadow values agree (the same inf, or both NaN) count as exact (:meth:`Passes.nonfinite`:
        two plain passes in the C kernel, ~10 float64 passes in torch)."""
        dm, sm, rmax, r_finite = ps.nonfinite(fi.floor, _TINY)
        e = dm / max(sm * fi.floor, _TINY) if math.isfinite(dm) else math.inf
        if not r_finite:
            # every inf / NaN equal to its shadow and the rest within tolerance: whether they
            # are inherited is all that is left to ask (see Measurer._new_nonfinite)
            return (_AGREEING if rmax <= fi.tol else _NONFINITE), e, sm
        return not rmax <= fi.tol, e, sm

    # -- slow path -----------------------------------------------------------------------------
    def _slow_path(self, call: ShadowedCall, slow: list[Slow], extra: _SlowPath) -> None:
        self.stats.ops_slow_path += 1
        self._new_cause = None
        try:
            self._check_slow(call, slow, extra)
        finally:
            cause, self._new_cause = self._new_cause, None
        if cause is not None:  # the results carry this op's finding to whatever they feed
            for _, r, _ in slow:
                self.shadows.store.set_cause(r, cause)

    def _check_slow(self, call: ShadowedCall, slow: list[Slow], extra: _SlowPath) -> None:
        locals_ = self._local_outputs(call, slow[0][1].dtype) if call.has_shadow else None
        for i, r, s in slow:
            loc = locals_[i] if locals_ is not None and i < len(locals_) else r
            if not isinstance(loc, torch.Tensor) or loc.shape != r.shape:
                loc = r
            res = _Result(i, r, s, loc, self.fmts[r.dtype])
            fin_r = torch.isfinite(r)
            if not bool(fin_r.all()):
                self._nonfinite(call, extra, res)
            self._precision(call, extra, res, fin_r)

    def _local_outputs(self, call: ShadowedCall, out_dtype: torch.dtype) -> list[Any] | None:
        """The op on the shadow inputs rounded to the real formats (None if it refuses)."""

        def arg(a: Any, s: Any) -> Any:
            return self._round_local(a, s, out_dtype)

        def kwarg(a: Any, s: Any) -> Any:  # non-tensor keywords keep their real values
            return self._round_local(a, s, out_dtype) if isinstance(a, torch.Tensor) else a

        largs = map_pairs(arg, call.args, call.sargs)
        lkwargs = map_pair_kwargs(kwarg, call.kwargs, call.skwargs)
        try:
            return leaves(call.func(*largs, **lkwargs))
        except Exception:
            return None

    def _round_local(self, a: Any, s: Any, out_dtype: torch.dtype) -> Any:
        """Shadow input rounded to the format the op's exact input would have.

        That is the input's own real format, or the output's where the output is finer (a
        widening or mixed-precision op must not be blamed for its inputs' coarser rounding).
        """
        if not (isinstance(a, torch.Tensor) and isinstance(s, torch.Tensor) and a.dtype in LOW):
            return s
        dt = a.dtype
        if _PRECISION.get(out_dtype, 0) > _PRECISION[dt] and out_dtype in LOW:
            dt = out_dtype
        fi = self.fmts[dt]
        if fi.fmt is None:
            return s.to(dt)
        self.rounding = True
        try:
            return quantize(s, fi.fmt).to(dt)
        finally:
            self.rounding = False

    def _record(self, call: ShadowedCall, hit: Hit) -> None:
        """Log ``hit`` linked to the finding its inputs carry; a range finding (overflow, ...)
        becomes the cause carried by this call's results (set in :meth:`_slow_path`)."""
        cause = None
        if hit.kind in _NONFINITE_KINDS:  # what a flushed or infinite input can cause
            cause = call.inputs.cause or self._flushed_input(call)
        label = self.log.add(call.info.name, call.phase, call.site, replace(hit, cause=cause))
        if hit.kind in CAUSE_KINDS and self._new_cause is None:
            self._new_cause = label

    def _flushed_input(self, call: ShadowedCall) -> str | None:
        """The root cause of a non-finite result whose inputs carry no finding: an input that
        holds zeros where its shadow does not (an underflow below the noise floor of the op that
        computed it, harmless until, say, a log or a division) or infs where its shadow is
        finite. That op gets the underflow / overflow finding, labelled as the cause. Cost: two
        passes per tensor input, only when a non-finite finding is recorded."""
        written = set(call.info.written)
        for i, (a, s) in enumerate(zip(call.args, call.sargs, strict=False)):
            if i in written or not (isinstance(a, torch.Tensor) and isinstance(s, torch.Tensor)):
                continue
            origin = self.shadows.store.origin(a)
            if origin is None or a.dtype not in self.fmts or s.shape != a.shape:
                continue
            label = self._flush_finding(origin, a, s)
            if label is not None:
                return label
        return None

    def _flush_finding(self, origin: Any, a: torch.Tensor, s: torch.Tensor) -> str | None:
        """Log an underflow (zeros with non-zero shadows) or overflow (infs with finite
        shadows) of ``a`` at the op call ``origin`` that computed it; its label, or None."""
        res = _Result(0, a, s, a, self.fmts[a.dtype])
        op, phase, site = origin
        flushed = (a == 0) & (s != 0)
        n = int(flushed.sum())
        if n:  # relative error 1: the value is gone, its sign and magnitude with it
            hit = replace(res.all_bits_lost("underflow", flushed, n), rel=1.0)
            return self.log.add(op, phase, site, hit)
        over = torch.isinf(a) & torch.isfinite(s)
        n = int(over.sum())
        return self.log.add(op, phase, site, res.all_bits_lost("overflow", over, n)) if n else None

    def _nonfinite(self, call: ShadowedCall, extra: _SlowPath, res: _Result) -> None:
        """nan / overflow / inf findings, element by element: a NaN reached by a NaN input, or
        an inf reached by any non-finite input, is inherited; every other one is new."""
        nan_t, any_t = extra.taint(res.i, res.r)
        nan_r = torch.isnan(res.r)
        if nan_t is not None:
            nan_r &= ~nan_t
        n_nan = int(nan_r.sum())
        if n_nan:
            self._record(call, res.all_bits_lost("nan", nan_r, n_nan))
        inf_r = torch.isinf(res.r)
        if any_t is not None:
            inf_r &= ~any_t
        if not bool(inf_r.any()):
            return
        fin_s = torch.isfinite(res.s)
        over = inf_r & fin_s
        n_over = int(over.sum())
        if n_over:
            self._record(call, res.all_bits_lost("overflow", over, n_over))
        inf_s = inf_r & ~fin_s
        n_inf = int(inf_s.sum())
        if n_inf:
            self._record(call, res.all_bits_lost("inf", inf_s, n_inf))

    def _precision(
        self, call: ShadowedCall, extra: _SlowPath, res: _Result, fin_r: torch.Tensor
    ) -> None:
        """underflow / cancellation / precision_loss findings, measured on the local result."""
        r, s, loc, fi = res.r, res.s, res.loc, res.fi
        a = s.abs()
        den, lerr, flag, n_flag = self._local_error(call, extra, res, a, fin_r)
        if not n_flag:
            return
        errs = (lerr, torch.sub(r, s).abs_().div_(den))
        small_l = loc.abs() < fi.min_normal
        under = flag & (a < fi.min_normal) & (a > 0) & small_l
        n_under = int(under.sum())
        if n_under:
            self._record(call, res.flagged("underflow", under, n_under, errs))
        n_rest = n_flag - n_under
        if not n_rest:
            return
        rest = flag & ~under if n_under else flag
        kind, cancelled = "precision_loss", None
        if call.info.addsub:
            kind, cancelled = "cancellation", _cancelled_bits(call, s, rest)
        self._record(call, res.flagged(kind, rest, n_rest, errs, cancelled))

    @staticmethod
    def _local_error(
        call: ShadowedCall, extra: _SlowPath, res: _Result, a: torch.Tensor, fin_r: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(denominator, local relative error, flagged elements, their count)."""
        s, loc, fi = res.s, res.loc, res.fi
        valid = fin_r & torch.isfinite(s) & torch.isfinite(loc)
        any_t = extra.taint(res.i, res.r)[1]
        if any_t is not None:  # elements fed by inf / NaN inputs: judged by _nonfinite only
            valid &= ~any_t
        amax = torch.where(valid, a, 0.0).amax()
        den = torch.maximum(a, (amax * fi.floor).clamp_(min=_TINY))
        lerr, flag, n_flag = _over_tol(loc, s, den, valid, fi.tol)
        if n_flag and (call.info.multilinear or res.i in call.info.sum_results):
            # a sum of products is judged against the sum of |products| (what a backward-
            # stable evaluation can err by), not against a result that cancelled to ~0
            terms = extra.terms(res.i, s)
            if terms is not None:
                den = torch.maximum(den, terms.abs())
                lerr, flag, n_flag = _over_tol(loc, s, den, valid, fi.tol)
        return den, lerr, flag, n_flag

    # -- decisions -----------------------------------------------------------------------------
    def _decision(self, call: ShadowedCall, r: torch.Tensor, s: torch.Tensor) -> None:
        """Integer / boolean results of float inputs: do they match the shadow's?"""
        flips = self._flips(call, r, s)
        if not flips:
            return
        site = call.site
        if site.where is None:  # a backward op without a forward line: the backward() call
            site = site._replace(where=user_frame())
        self.log.add(call.info.name, call.phase, site, _flip_hit(r, flips))

    def _flips(self, call: ShadowedCall, r: torch.Tensor, s: torch.Tensor) -> int:
        if r.shape != s.shape:
            return max(r.numel(), s.numel())
        if call.info.index_decision is not None and r.dtype == torch.int64:
            return self._index_flips(call, r, s)
        flips = int((r != s).sum())
        if flips and r.dtype == torch.bool:
            self.shadows.decisions.put(r, s)  # a mask: a `where` built from it flips too
        return flips

    @staticmethod
    def _index_flips(call: ShadowedCall, r: torch.Tensor, s: torch.Tensor) -> int:
        """Indices that differ *and* select different shadow values (ties are no flips)."""
        pos, dpos, ddef = call.info.index_decision  # type: ignore[misc]
        x = call.sargs[pos]
        if not isinstance(x, torch.Tensor):
            return 0
        dim = call.kwargs.get("dim", call.args[dpos] if len(call.args) > dpos else ddef)
        if not bool((r != s).any()):
            return 0
        if dim is None or isinstance(dim, bool):
            xf = x.reshape(-1)
            return int((xf[r.reshape(-1)] != xf[s.reshape(-1)]).sum())
        keep = r.dim() == x.dim()
        ri, si = (r, s) if keep else (r.unsqueeze(dim), s.unsqueeze(dim))
        return int((x.gather(dim, ri) != x.gather(dim, si)).sum())

    def check_where(self, op: str, args: tuple[Any, ...], phase: str, site: Site) -> None:
        """A ``where`` whose mask is a flipped comparison flips the same elements."""
        cond = args[0]
        if not isinstance(cond, torch.Tensor):
            return
        ent = self.shadows.decisions.get(cond)
        if ent is None:
            return
        flips = int((ent[0] != cond).sum())
        if flips:
            self.log.add(op, phase, site, _flip_hit(cond, flips))

    # -- roundings outside aten ----------------------------------------------------------------
    def check_rounding(
        self, op: str, phase: str, site: Site, s: torch.Tensor, dst: torch.Tensor, fmt: FloatFormat
    ) -> None:
        """``dst`` is ``s`` (a shadow) rounded to ``fmt``: overflow and underflow findings."""
        fi = make_fmt_info(fmt, self.threshold_bits)
        with torch.no_grad():
            r = dst.detach().to(self.shadows.dtype)
            res = _Result(0, r, s, r, fi)
            a = s.abs()
            inf_r = torch.isinf(r) & torch.isfinite(s)
            n = int(inf_r.sum())
            if n:
                self.log.add(op, phase, site, res.all_bits_lost("overflow", inf_r, n))
            err = (r - s).abs() / torch.maximum(a, (a.amax() * fi.floor).clamp_(min=_TINY))
            under = (err > fi.tol) & (a < fi.min_normal) & (a > 0) & (r.abs() < fi.min_normal)
            n = int(under.sum())
            if n:
                self.log.add(op, phase, site, res.flagged("underflow", under, n, (err, err)))
