"""Run an unmodified Python script with a precision policy applied to every torch op it runs.

    mixprec run --autocast FORMAT [--emulate] script.py [script args]

The script runs as ``__main__`` (like ``python script.py``) inside ``mixprec.autocast(FORMAT)``:
matmul, linear, conv and attention get their operands rounded to FORMAT (their gradients too)
and accumulate in float32; softmax, norms, reductions, losses and exp/log stay float32;
everything else follows its inputs. FORMAT is any mixprec format (``bf16``, ``fp16``, ``e4m3``,
``e2m1``, ``mxfp8``, custom ``e5m7``) or a policy string (``p=bf16,c=bf16,o=f32``).
``--emulate`` rounds bit-exactly in float32 storage even where the hardware runs the format
natively (without it: native where fast, as ``mixprec.autocast(FORMAT)`` decides).

What it cannot change without code: the weights stay float32 tensors updated by the script's
optimizer (no low-precision weight storage, so no fp32 master copies), and there is no loss
scaling (fp16 and fp8 gradients that underflow flush to zero) and no skipped steps. Those need
``mixprec.initialize`` and ``mixprec.scale_loss`` in the training loop (docs/amp.md). A policy
region belongs to one thread: ops the script runs in other threads are outside it.

mixprec's own options may appear before or after the script path; everything else after the
script path goes to the script, and everything after a bare ``--`` goes to the script verbatim.
Every option is checked before the script starts: a bad one is a usage error,
``mixprec run: error: ...`` with exit status 2, and the script does not run.

Exit status: the script's own, as under ``python script.py`` (``sys.exit(N)`` gives N, a
``sys.exit("message")`` or an uncaught exception 1, Ctrl-C 130); 2 for a bad command line.
"""

from __future__ import annotations

import argparse

from mixprec.cli.arguments import checked_by
from mixprec.cli.scripts import (
    ScriptOption,
    add_script_arguments,
    prepare_script,
    run_script,
    script_check,
)


def _coerce_policy(text: str) -> object:
    from mixprec import Policy

    return Policy.coerce(text)


#: A format name or a policy string that :func:`mixprec.autocast` accepts.
policy_text = checked_by(_coerce_policy, "policy")


_OPTIONS = (
    ScriptOption(
        "--autocast",
        None,
        "the format (bf16, fp16, e4m3, ...) or policy string (p=f32,c=bf16,o=f32) to run the "
        "script's ops in (required)",
        type=policy_text,
        metavar="FORMAT",
    ),
    ScriptOption(
        "--emulate",
        False,
        "round bit-exactly in float32 storage even where the format runs natively",
        action="store_true",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_script_arguments(parser, _OPTIONS)


def _prepare(args: argparse.Namespace) -> None:
    """Split off the script, check it and the options; ValueError if something is bad."""
    prepare_script(args, _OPTIONS, "run")
    if args.autocast is None:
        raise ValueError("the --autocast FORMAT option is required (e.g. --autocast bf16)")


check = script_check(_prepare)


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "script"):  # called without check(): same checks, as ValueError
        _prepare(args)
    from mixprec import autocast

    # --emulate forces emulation; without it the region picks native where the format is fast
    with autocast(args.autocast, emulate=True if args.emulate else None):
        return run_script(args.script, args.script_argv)
