"""Error measurement per op: real results against shadows, local error, findings (private).

For each result of a shadowed op the fast path (:meth:`Measurer._suspicious`, four float32
passes) decides whether any element could be a finding. Only then (the slow path, rare on
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
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch

from mixprec.formats import FloatFormat
from mixprec.quantization import quantize
from mixprec.sanitizer.attribution import user_frame
from mixprec.sanitizer.findings import FindingLog, Hit, Site, Stats
from mixprec.sanitizer.ops import OpInfo, RealCall
from mixprec.sanitizer.shadows import LOW, ShadowInputs, Shadows
from mixprec.sanitizer.tolerances import FmtInfo, bits_lost, make_fmt_info
from mixprec.sanitizer.trees import (
    leaves,
    map_pair_kwargs,
    map_pairs,
    map_tensor_kwargs,
    map_tensors,
    tensors,
)

_TINY = 2.0**-1022  # smallest normal float64: keeps 0/0 out of the fast path
_AMP = 4.0  # re-check an op locally only if its error is > _AMP x the error it inherited
_PRECISION = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}

Slow = tuple[int, torch.Tensor, torch.Tensor]  # (result position, real, shadow)


@dataclass(frozen=True)
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

    def __init__(self, call: ShadowedCall) -> None:
        self.call = call

    @cached_property
    def inputs_nonfinite(self) -> tuple[bool, bool]:
        """(any NaN, any Inf) among the inputs (mutated ones: their shadows, the old values)."""
        written = {w for w in self.call.info.written if isinstance(w, int)}
        args = [
            s if i in written else a
            for i, (a, s) in enumerate(zip(self.call.args, self.call.sargs, strict=False))
        ]
        floats = [t for t in tensors(args) if t.is_floating_point() and t.numel()]
        has_nan = any(bool(torch.isnan(t).any()) for t in floats)
        has_inf = any(bool(torch.isinf(t).any()) for t in floats)
        return has_nan, has_inf

    @cached_property
    def abs_outputs(self) -> list[Any] | None:
        """The op on |shadow inputs| (|alpha|, |beta|): for a multilinear op, the sum of the
        absolute values of its terms, element by element. None if the op refuses."""
        call = self.call

        def ab(t: torch.Tensor) -> torch.Tensor:
            return t.abs() if t.is_floating_point() else t

        kw = map_tensor_kwargs(ab, call.skwargs)
        # scalar multipliers (addmm's alpha, beta) enter by their magnitude too
        kw.update({k: abs(v) for k, v in call.skwargs.items() if k in ("alpha", "beta")})
        try:
            return leaves(call.func(*map_tensors(ab, call.sargs), **kw))
        except Exception:
            return None


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

    def measure(self, call: ShadowedCall, reals: list[Any], souts: list[Any]) -> None:
        """Check the results of a rounding op; the slow path for the suspicious ones."""
        slow = self._fast_path(call, reals, souts)
        if slow:
            self._slow_path(call, slow)

    # -- fast path -----------------------------------------------------------------------------
    def _fast_path(self, call: ShadowedCall, reals: list[Any], souts: list[Any]) -> list[Slow]:
        """Store each result's shadow; return the results worth the slow path."""
        shadowable, sdt = self.shadows.shadowable, self.shadows.dtype
        slow: list[Slow] = []
        for i, (r, s) in enumerate(zip(reals, souts, strict=False)):
            if not isinstance(r, torch.Tensor) or not isinstance(s, torch.Tensor):
                continue
            if r.dtype in shadowable:
                if r.numel() == 0:
                    continue
                s = s if s.dtype == sdt else s.to(sdt)
                suspicious, e_out, smax = self._suspicious(r, s, self.fmts[r.dtype])
                self.shadows.store.put(r, s, e_out, smax)
                # the local re-run only where this op made the error worse: more than _AMP times
                # the error it inherited (non-finite inherited errors: nothing new to report)
                if suspicious and e_out > _AMP * call.err and math.isfinite(call.err):
                    slow.append((i, r, s))
            elif call.has_shadow and not r.is_floating_point() and not r.is_complex():
                self._decision(call, r, s)
        return slow

    @staticmethod
    def _suspicious(r: torch.Tensor, s: torch.Tensor, fi: FmtInfo) -> tuple[bool, float, float]:
        """Could any element of ``r`` be a finding? Cheap sufficient test first.

        Returns (suspicious, e, smax) with ``e = max|r - s| / (floor * max|s|)``, the error bound
        kept with the shadow (inf when non-finite values are involved), and an upper bound of
        ``max|s|`` (kept for the gradient histogram).

        Cheap (4 float32 passes, one sync): if ``max|r - s| <= tol * floor * max|s|`` then every
        element satisfies ``|r_i - s_i| <= tol * max(|s_i|, floor * max|s|)``, the flagging
        criterion, so nothing can be flagged. Computing the difference in float32 against the
        shadow rounded to float32 adds at most half a float32 ulp, far below any threshold.
        Otherwise the exact elementwise test in float64 decides. NaN/inf make both tests fail.
        """
        rf = r if r.dtype == torch.float32 else r.float()
        s32 = s.float()
        smin, smax = torch.aminmax(s32)
        dmin, dmax = torch.aminmax(s32.sub_(rf))  # s - r in place: one temporary, not two
        dn, dx, sn, sx = torch.stack((dmin, dmax, smin, smax)).tolist()
        dm, sm = max(-dn, dx), max(-sn, sx)
        smax = sm * (1.0 + 2.0**-23)  # s32 is s rounded to nearest: bound max|s| from above
        if sm > 0:
            e = dm / (fi.floor * sm)
            if e <= fi.tol:
                return False, e, smax
        else:
            e = 0.0 if dm == 0 else math.inf
        if not math.isfinite(e) or not math.isfinite(sm):
            e = math.inf
        if dm == 0 and sm == 0 and not bool(s.any()):
            return False, 0.0, 0.0  # exactly zero
        a = s.abs()
        floor = (a.amax() * fi.floor).clamp_(min=_TINY)
        rmax = float(torch.sub(r, s).abs_().div_(a.clamp_(min=floor)).amax())
        return not rmax <= fi.tol, e, smax  # NaN (non-finite somewhere) is suspicious

    # -- slow path -----------------------------------------------------------------------------
    def _slow_path(self, call: ShadowedCall, slow: list[Slow]) -> None:
        self.stats.ops_slow_path += 1
        extra = _SlowPath(call)
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
        self.log.add(call.info.name, call.phase, call.site, hit)

    def _nonfinite(self, call: ShadowedCall, extra: _SlowPath, res: _Result) -> None:
        """nan / overflow / inf findings, unless the inputs already held NaN or Inf."""
        if any(extra.inputs_nonfinite):
            return  # inherited
        nan_r = torch.isnan(res.r)
        n_nan = int(nan_r.sum())
        if n_nan:
            self._record(call, res.all_bits_lost("nan", nan_r, n_nan))
        inf_r = torch.isinf(res.r)
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
        amax = torch.where(valid, a, 0.0).amax()
        den = torch.maximum(a, (amax * fi.floor).clamp_(min=_TINY))
        lerr, flag, n_flag = _over_tol(loc, s, den, valid, fi.tol)
        if n_flag and call.info.multilinear:
            # a sum of products is judged against the sum of |products| (what a backward-
            # stable evaluation can err by), not against a result that cancelled to ~0
            outs = extra.abs_outputs
            terms = outs[res.i] if outs is not None and res.i < len(outs) else None
            if isinstance(terms, torch.Tensor) and terms.shape == s.shape:
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
            site = replace(site, where=user_frame())
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
