"""Graph capture for :func:`mixprec.stabilize`: torch.fx symbolic tracing, or torch.export.

Without example inputs a model is traced symbolically (cheap, no tensor is evaluated, but
data-dependent Python fails: ``assert t <= block_size``, slicing a buffer by the sequence length,
transformers' argument handling). With example inputs it is captured by torch.export in
non-strict mode, which runs the Python with fake tensors and so follows whatever the model does
for inputs of that kind; the graph is then made of ATen ops, which the rules match as well.
Either way every node keeps the stack trace of the user line that created it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]*)\n(?P<code>[^\n]*)'
)
_INTERNAL = (
    str(Path(torch.__file__).resolve().parent),
    str(Path(__file__).resolve().parent),
)


def _internal(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_INTERNAL)


def source_location(node: fx.Node) -> tuple[str, str]:
    """``("file:line", "code")`` of the user's line that created ``node`` (or a fallback).

    The innermost frame outside torch and mixprec in the node's recorded stack trace: the
    line inside a helper function rather than the ``forward`` line that called the helper.
    """
    trace = node.meta.get("stack_trace")
    if trace:
        f = _innermost_frame(trace, user_only=False)
        if f is not None:
            return f"{f['file']}:{f['line']}", f["code"].strip()
    return f"<graph>:{node.name}", ""


def _innermost_frame(trace: str, *, user_only: bool) -> re.Match[str] | None:
    """The innermost frame of a traceback text outside torch and mixprec; where there is
    none, the innermost frame at all, or None with ``user_only``."""
    frames = list(_FRAME.finditer(trace))
    user = [f for f in frames if not _internal(f["file"])]
    last = user or ([] if user_only else frames)
    return last[-1] if last else None


class _Tracer(fx.Tracer):
    """fx's tracer with stack traces on, also for plain functions.

    fx keeps a node's stack only from the first frame named ``forward``, so a traced function
    would get none; we keep the frames below the tracer's own (the traced code and what it
    calls), minus torch's and ours.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def _filter_traceback_frames(
        self, user_stack_summary: traceback.StackSummary
    ) -> traceback.StackSummary:
        frames = list(user_stack_summary)
        start = 0
        for i, f in enumerate(frames):
            if Path(f.filename).match("torch/fx/_symbolic_trace.py"):
                start = i + 1
        return traceback.StackSummary.from_list(
            [f for f in frames[start:] if not _internal(f.filename)]
        )


def trace(module_or_fn: nn.Module | Callable[..., Any]) -> fx.GraphModule:
    """Symbolically trace a module or function, recording each node's source stack trace.

    A ``GraphModule`` is copied (its graph deep-copied), never modified in place.
    """
    if isinstance(module_or_fn, fx.GraphModule):
        gm = fx.GraphModule(module_or_fn, copy.deepcopy(module_or_fn.graph))
        gm.meta = dict(getattr(module_or_fn, "meta", {}))
        return gm
    if not (isinstance(module_or_fn, nn.Module) or callable(module_or_fn)):
        raise TypeError(
            f"stabilize expects an nn.Module, a GraphModule or a function, "
            f"got {type(module_or_fn).__name__}"
        )
    tracer = _Tracer()
    name = target_name(module_or_fn)
    try:
        graph = tracer.trace(module_or_fn)
    except Exception as exc:  # fx's messages (co_varnames, TraceError) do not say what to do
        raise CaptureError(
            f"torch.fx could not trace {name} symbolically ({_reason(exc)}); pass example "
            f"inputs, stabilize({name_hint(module_or_fn)}, example_args=(...), "
            "example_kwargs={...}), to capture it with torch.export instead"
        ) from exc
    return fx.GraphModule(tracer.root, graph, name)


class CaptureError(ValueError):
    """No graph could be captured; the message names the target, the reason and the fix."""


def target_name(module_or_fn: nn.Module | Callable[..., Any]) -> str:
    """The class name of a module, the ``__name__`` of a function."""
    if isinstance(module_or_fn, nn.Module):
        return type(module_or_fn).__name__
    return getattr(module_or_fn, "__name__", "fn")


def name_hint(module_or_fn: nn.Module | Callable[..., Any]) -> str:
    return "model" if isinstance(module_or_fn, nn.Module) else target_name(module_or_fn)


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


class _Function(nn.Module):
    """A plain function as a module, for torch.export (which exports modules only)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _auto_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Every dim of every tensor input as ``Dim.AUTO``: export keeps a dim symbolic when the
    code allows it and specialises it otherwise, so the capture works for other batch sizes and
    sequence lengths wherever the model does."""

    def spec(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(a.dim())}
        return None

    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _register_output_pytrees(module: nn.Module) -> None:
    # transformers' models return a DynamicCache, which torch.export can only flatten once
    # transformers has registered it as a pytree node (its own export helper; idempotent);
    # encoder-decoder models (T5, ...) return an EncoderDecoderCache of two, which it does not
    # register: registered here (once, unless transformers has since done it itself)
    if not type(module).__module__.startswith("transformers."):
        return
    try:
        from transformers.cache_utils import EncoderDecoderCache
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return
    register_dynamic_cache_export_support()
    if EncoderDecoderCache not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(
            EncoderDecoderCache,
            _flatten_encoder_decoder_cache,
            lambda children, _: EncoderDecoderCache(*children),
            serialized_type_name="transformers.cache_utils.EncoderDecoderCache",
        )


def _flatten_encoder_decoder_cache(cache: Any) -> tuple[list[Any], None]:
    return [cache.self_attention_cache, cache.cross_attention_cache], None


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # Dim.AUTO on a size-1 dim logs a warning per input ("specialized"): expected here, since
    # every dim is offered as dynamic; the level is restored on exit
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_graph(
    module_or_fn: nn.Module | Callable[..., Any],
    example_args: tuple[Any, ...],
    example_kwargs: dict[str, Any],
) -> fx.GraphModule:
    """Capture ``module_or_fn(*example_args, **example_kwargs)`` with torch.export (non-strict).

    Dims are exported as ``Dim.AUTO`` first (symbolic where the code allows); if that fails, with
    the example shapes fixed. The result is the unlifted module: the same ``Parameter`` and
    buffer objects as the original under the same ``state_dict`` keys, the same calling
    convention (positional and keyword inputs, nested outputs such as transformers'
    ``ModelOutput``). Cost: one or two runs of the Python forward on fake tensors (no data).
    """
    name = target_name(module_or_fn)
    if isinstance(module_or_fn, nn.Module):
        module = module_or_fn
    elif callable(module_or_fn):
        module = _Function(module_or_fn)
    else:
        raise TypeError(
            f"stabilize expects an nn.Module, a GraphModule or a function, "
            f"got {type(module_or_fn).__name__}"
        )
    _register_output_pytrees(module)
    errors: list[BaseException] = []
    for dynamic in (True, False):
        try:
            shapes = _auto_shapes(module, example_args, example_kwargs) if dynamic else None
            with _quiet_export():
                ep = torch.export.export(
                    module, example_args, example_kwargs, strict=False, dynamic_shapes=shapes
                )
        except Exception as exc:  # reported below with the static attempt's reason
            errors.append(exc)
            continue
        gm = ep.module()
        gm.meta["stabilize_captured_by"] = "torch.export"
        return gm
    raise CaptureError(
        f"torch.export could not capture {name} with the example inputs given "
        f"({_reason(errors[-1])}); {_export_fix(errors[-1], name_hint(module_or_fn))}"
    ) from errors[-1]


def _export_fix(exc: BaseException, hint: str) -> str:
    """What to do about an export failure: the cases seen on transformers' models, else the
    general advice."""
    text = str(exc)
    if "DataDependent" in type(exc).__name__ or "data-dependent" in text:
        # torch's message ends with the frame of the call that branched ("The following call
        # raised this error:"): the user's line, when one is outside torch and mixprec
        f = _innermost_frame(text, user_only=True)
        where = "" if f is None else f" at {Path(f['file']).name}:{f['line']} ({f['code'].strip()})"
        return (
            f"the model branches on a tensor's value{where}, which torch.export cannot "
            "capture: give example inputs that do not take that branch (e.g. no labels, with "
            "the loss computed outside the captured model)"
        )
    if "DynamicCache" in text:
        return (
            "its output holds a cache torch.export cannot flatten: pass use_cache=False in "
            "example_kwargs (a graph for training needs no cache)"
        )
    return (
        f"check that {hint}(*example_args, **example_kwargs) runs eagerly and that the "
        "example inputs match its forward"
    )
