"""How the fused kernels are compiled: one ``torch.compile`` per pure function of
:mod:`steadylm.kernels._math`, cached, with the token dimension dynamic.

Shared by :mod:`.ops` (the public ops and their traced form) and :mod:`.library` (the custom ops);
kept apart from both so that neither imports the other's module at call time.

Set the environment variable ``STEADYLM_COMPILE_KERNELS=0`` (or call :func:`set_compile`) to run
the very same math eagerly, e.g. where no C++ compiler is available.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.nn import Parameter

__all__ = ["compile_enabled", "set_compile"]

_compile_enabled: bool = os.environ.get("STEADYLM_COMPILE_KERNELS", "1").strip() not in ("0", "false", "no")




def _separate_inductor_cache_per_cpu_capability() -> None:
    """Give each ``ATEN_CPU_CAPABILITY`` its own Inductor cache directory (unless one is set).

    Inductor picks its vector ISA from ``ATEN_CPU_CAPABILITY`` but does not put that choice in its
    on-disk FX-graph cache key (torch 2.13). C++ generated for one ISA is then recompiled for
    another: code written for 8-lane avx2 vectors, rebuilt for 16-lane avx512, stores past the end
    of its buffers ("double free or corruption", SIGABRT/SIGSEGV in the fused backward; measured),
    and avx512 code fails to build under ``default``. Runs that never set the variable keep
    torch's default directory. Called at import, before anything is compiled: Inductor reads the
    variable when it first needs the directory.
    """
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if not capability or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"


_separate_inductor_cache_per_cpu_capability()


def set_compile(enabled: bool) -> None:
    """Turn compilation of the fused kernels on (default) or off (same math, run eagerly)."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


def compile_enabled() -> bool:
    """Whether the fused kernels are currently compiled with ``torch.compile``."""
    return _compile_enabled


#: Below this many elements a CPU kernel runs on one thread: ATen's own ``parallel_for`` grain
#: size (``at::internal::GRAIN_SIZE``). Inductor cannot decide that itself for a kernel whose row
#: count is dynamic, and always opens an OpenMP parallel region: measured in a micro-preset decode
#: step at batch 4 on 2 threads, that costs ~18 µs per fused call (every kernel of the step serial:
#: 4.82 -> 4.47 ms per step).
SERIAL_BELOW = 32768


@functools.cache
def _compiled(fn: Callable[..., Any], serial: bool = False) -> Callable[..., Any]:
    # Not fullgraph: with fullgraph=True, Dynamo turns its recompile limit (8 specialisations per
    # function: dtypes × hidden sizes × optional-argument flags) into a hard error; without it, the
    # ninth specialisation runs the same math eagerly. Graph-break freedom is tested separately
    # (tests/test_kernels.py compiles a module using every op with fullgraph=True).
    if not serial:
        return torch.compile(fn)
    # Its own copy of the code object: Dynamo keys its cache (and that recompile limit) on the code,
    # so the serial build neither evicts nor counts against the parallel one.
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, options={"cpp.threads": 1})


def _kernel(fn: Callable[..., Any], like: Tensor) -> Callable[..., Any]:
    """What to call for ``fn`` on inputs like ``like``: its compiled version (built for one thread
    when ``like`` is a CPU tensor of fewer than :data:`SERIAL_BELOW` elements), or ``fn`` itself
    when compilation is off.

    Under an outer ``torch.compile`` the plain function: Dynamo is already tracing and would
    inline the inner compiled wrapper anyway; under a dispatch mode or forward-mode AD too
    (:func:`_needs_plain_math`). Returned rather than called here so that the arguments are passed
    once (a decode step's ops are small enough for that to show).
    """
    if not _compile_enabled or torch.compiler.is_compiling() or _needs_plain_math():
        return fn
    return _compiled(fn, like.device.type == "cpu" and like.numel() < SERIAL_BELOW)


def _needs_plain_math() -> bool:
    """The plain function must run, not a compiled kernel, when

    * a ``TorchDispatchMode`` is active (fake tensors, ``make_fx``, ``FlopCounterMode``, ...): it
      must see the kernel's ATen ops (a compiled kernel runs them behind its back; called on fake
      tensors it read their missing data and crashed);
    * a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``): compiled kernels
      drop the tangents of dual inputs, silently (with grad mode off every op would have returned
      no tangent), while the ATen ops carry them.
    """
    return torch._C._len_torch_dispatch_stack() > 0 or forward_ad_open()


def forward_ad_open() -> bool:
    """A forward-mode AD level is open. torch has no public query for it; ``_current_level`` is the
    ``forward_ad`` module's own record of the open level (-1: none)."""
    return _forward_ad._current_level >= 0


def _direct_devices(setting: str) -> frozenset[str]:
    """Device types from a comma-separated ``STEADYLM_DIRECT_DEVICES`` value (e.g. ``cpu,cuda``)."""
    return frozenset(name.strip().lower() for name in setting.split(",") if name.strip())


#: Devices whose forward kernels run as direct builds when grad mode is off (:func:`forward`).
#: Measured on CPU: a decode-sized RMSNorm kernel costs 11–13 µs through Dynamo and 6 µs called
#: directly (HF's eager 7-op RMSNorm: 9 µs). CUDA keeps the Dynamo builds until measured there:
#: ``STEADYLM_DIRECT_DEVICES=cpu,cuda`` opts it in, for that measurement (``python -m
#: steadylm.bench.call_overhead --device cuda``; the bits check is ``tests/test_kernel_direct.py``).
DIRECT_DEVICES: frozenset[str] = _direct_devices(os.environ.get("STEADYLM_DIRECT_DEVICES", "cpu"))

_direct_enabled: bool = os.environ.get("STEADYLM_DIRECT_KERNELS", "1").strip() not in ("0", "false", "no")

#: (fn, serial, rows, keyword arguments, the device's autocast dtype or None, then per positional argument
#: its value or, for a tensor, (dtype, device, non-row sizes)) -> the direct build and whether its
#: kernel returns one tensor (:func:`_build_direct`).
_DIRECT: dict[tuple, tuple[Callable[[list[Tensor]], Any], bool]] = {}


def _example_rows(like: Tensor, serial: bool) -> int:
    """The row count of the example a direct build is traced with: Inductor sizes its code by it.

    Never 0 or 1 (such a dim would be specialised): a 1-row decode call gets the same general-row
    build as 4 rows. A CPU build for many elements (not ``serial``) is traced with the fewest rows
    that call it, at least :data:`SERIAL_BELOW` elements: Inductor opens an OpenMP region only for a
    loop whose size hint gives each thread enough work, and an example of 2 rows made such kernels
    single-threaded (the flattened gated ops at every size, the norms below d = 512: micro-preset
    training ran its fused forwards on one of two cores). Fixed by the non-row sizes, not the first
    call's rows, so the build is the same whichever call comes first.
    """
    if serial or not like.is_cpu:
        return 2
    per_row = 1
    for size in like.shape[1:]:
        per_row *= int(size)
    return max(2, -(-SERIAL_BELOW // max(per_row, 1)))


def _build_direct(
    fn: Callable[..., Any], serial: bool, args: tuple, kwargs: dict, rows: tuple[int, ...]
) -> tuple[Callable[[list[Tensor]], Any], bool]:
    """``fn`` traced to an ATen graph (dim 0 of the ``rows`` tensors symbolic, everything else as
    given) and compiled by Inductor without Dynamo: the compiled graph, called with a list of the
    tensor arguments (Inductor's boxed convention; it empties the list), and whether ``fn``
    returns one tensor (the graph returns a tuple either way)."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    template = [None if isinstance(a, Tensor) else a for a in args]
    single = False

    def graph(*tensors: Tensor) -> tuple[Tensor, ...]:
        nonlocal single
        full = list(template)
        for i, t in zip(positions, tensors):
            full[i] = t
        out = fn(*full, **kwargs)
        single = isinstance(out, Tensor)
        return (out,) if single else tuple(out)

    like_is_cpu = args[rows[0]].is_cpu
    example_rows = _example_rows(args[rows[0]], serial)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = []
    for i in positions:
        t = args[i]
        row = i in rows
        example = torch.empty(
            ((example_rows,) + tuple(t.shape[1:])) if row else t.shape, dtype=t.dtype, device=t.device
        )
        sizes = [DimDynamic.DYNAMIC if row and d == 0 else DimDynamic.STATIC for d in range(t.dim())]
        fakes.append(mode.from_tensor(example, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    with mode:
        # Decomposed as AOTAutograd decomposes a graph for Inductor (compile_fx_inner expects it so).
        traced = make_fx(graph, decomposition_table=select_decomp_table(), tracing_mode="real")(*fakes)
    # Inductor's own entry for an ATen graph (what AOTAutograd hands it), not standalone_compile:
    # the latter wraps the same compiled graph in Dynamo's and AOTAutograd's runtime layers, which
    # cost 3 µs of a 5 µs decode-sized call and have nothing to do for a pure forward kernel.
    # The thread count is pinned either way (it is what Inductor bakes into the code anyway): it puts
    # the choice into the FX graph cache's key, which has no other record of the example's rows, so
    # a build cached from a 2-row example (single-threaded code) is never reused for a parallel one.
    threads = 1 if serial else torch.get_num_threads()
    # No size/stride asserts in the generated call: forward() only takes this build for plain
    # contiguous tensors whose dtype, device and non-row sizes are in its key, so the strides are
    # the ones it was compiled for; the asserts cost ~0.45 µs per tensor of a decode-sized call.
    options: dict[str, Any] = {"size_asserts": False}
    if like_is_cpu:
        options["cpp.threads"] = threads
    with torch._inductor.config.patch(options):
        with torch._guards.tracing(torch._guards.TracingContext(mode)):
            return compile_fx_inner(traced, fakes), single


def forward(fn: Callable[..., Any], rows: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for a forward kernel; ``rows`` are the positions of the arguments
    whose dim 0 is the token (or element) count.

    With grad mode off (decoding, evaluation, and the body of a custom op, which autograd runs
    without grad mode) on a :data:`DIRECT_DEVICES` device, this runs a *direct build*: the kernel
    traced once to a decomposed ATen graph and compiled by Inductor (``compile_fx_inner``, the
    entry AOTAutograd uses), then called without Dynamo's frame evaluation, guards and
    AOTAutograd's runtime wrappers, which are most of a decode-sized call. Its cache key is
    everything the build specialises on (dtypes, devices, the non-row sizes, the non-tensor
    arguments), so it needs no guard; it gives the Dynamo build's bits
    (tests/test_kernel_direct.py). Anything else (grad mode on, under an outer ``torch.compile``, a
    dispatch mode, forward-mode AD or a ``torch.func`` transform, other devices, tensor subclasses,
    empty or non-contiguous inputs) takes :func:`_kernel`'s choice: the Dynamo build, or the plain
    function under a dispatch mode or forward-mode AD.
    """
    like = args[rows[0]]
    device_type = "cpu" if like.is_cpu else like.device.type
    if (
        _direct_enabled
        and _compile_enabled
        and not torch.is_grad_enabled()
        and device_type in DIRECT_DEVICES
        and like.shape[0] > 0
        and not torch.compiler.is_compiling()
        and not _needs_plain_math()
        # Inside torch.func transforms (vmap, grad, ...) tensors are wrappers without storage.
        and torch._C._functorch.peek_interpreter_stack() is None
    ):
        # Written as one loop: at decode sizes the key costs as much as a small kernel.
        # The device's autocast state is in the key: a build traced under it would keep its casts
        # (today's kernels use no autocast-listed op, so their graphs are the same either way:
        # checked in tests).
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        serial = like.is_cpu and like.numel() < SERIAL_BELOW
        key: list[Any] = [fn, serial, rows, tuple(kwargs.items()), autocast]
        tensors = []
        for i, a in enumerate(args):
            if isinstance(a, Tensor):
                # Plain tensors only (a subclass may reinterpret its storage), laid out as the build
                # was compiled for (it asserts the strides).
                if (type(a) is not Tensor and type(a) is not Parameter) or not a.is_contiguous():
                    break
                key.append((a.dtype, a.device, a.shape[1:] if i in rows else a.shape))
                tensors.append(a)
            else:
                key.append(a)
        else:
            frozen = tuple(key)
            build = _DIRECT.get(frozen)
            if build is None:
                build = _DIRECT[frozen] = _build_direct(fn, key[1], args, kwargs, rows)
            compiled, single = build
            out = compiled(tensors)
            return out[0] if single else tuple(out)
    for i in rows:
        _mark_rows_dynamic(args[i])
    return _kernel(fn, like)(*args, **kwargs)


def _mark_rows_dynamic(*tensors: Tensor | None) -> None:
    """Mark dim 0 (tokens / elements) dynamic so that new batch shapes reuse the kernel."""
    if torch.compiler.is_compiling() or not _compile_enabled:
        return
    for t in tensors:
        # Sizes 0 and 1 are specialised by Dynamo whatever the mark says: skip marking them.
        if t is not None and t.dim() >= 1 and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
