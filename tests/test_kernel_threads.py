"""Small CPU kernels are built for one thread (``kernels._compile.SERIAL_BELOW``).

Inductor opens an OpenMP parallel region in every kernel whose row count is dynamic, however few
rows it gets; in a decode step that fork/join costs more than the work. Below ATen's grain size the
fused ops call a copy of the kernel compiled with ``cpp.threads=1`` instead.
"""

from __future__ import annotations

import types

import pytest
import torch

from steadylm.kernels import _compile, _math, ops


def test_kernel_choice_follows_the_element_count():
    small = torch.empty(4, 256)
    large = torch.empty(_compile.SERIAL_BELOW // 256 + 1, 256)
    fn = _math.rms_norm_fwd
    assert _compile._kernel(fn, small) is _compile._compiled(fn, True)
    assert _compile._kernel(fn, large) is _compile._compiled(fn, False)
    assert _compile._compiled(fn, True) is not _compile._compiled(fn, False)


def test_serial_build_has_its_own_dynamo_cache():
    # Same code object would share Dynamo's cache and its recompile limit with the parallel build.
    serial = _compile._compiled(_math.swiglu_fwd, True)._torchdynamo_orig_callable
    assert serial.__code__ is not _math.swiglu_fwd.__code__
    assert serial.__code__.co_code == _math.swiglu_fwd.__code__.co_code  # the same function otherwise


def _fresh(fn):
    # A new code object: Dynamo keys its cache (and its 8-entry recompile limit) on the code, and
    # other tests in this process may have filled the shared function's cache, after which Dynamo
    # runs the function eagerly — bits this comparison is not about.
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@pytest.mark.parametrize("op", ["rms_norm", "bhyt_and_mean_square", "powlu_glu"])
def test_serial_and_parallel_builds_give_the_same_forward_bits(op):
    # Row-local forward math: one thread or two, each row is computed by the same vector code. (A
    # reduction *over rows*, such as a parameter gradient, may be split across threads and round
    # differently, as with any change of thread count.) Rows are dynamic, as the ops mark them.
    if not _compile.compile_enabled():
        pytest.skip("fused kernels run eagerly (STEADYLM_COMPILE_KERNELS=0)")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(53, 256, generator=gen)
    w = 1.0 + 0.1 * torch.randn(256, generator=gen)
    lam = torch.tensor(2.0)
    if op == "rms_norm":
        name, args, kwargs = "rms_norm_fwd", (x, w), dict(eps=1e-6, has_weight=True, allow_upscale=False)
    elif op == "bhyt_and_mean_square":
        name, args, kwargs = "bhyt_ms_fwd", (x, w, lam), dict(kappa=10.0, eps=1e-6, has_weight=True)
    else:
        name, args, kwargs = "powlu_glu_fwd", (x.reshape(-1), torch.randn(53 * 256, generator=gen), 3.0), {}
    torch._dynamo.maybe_mark_dynamic(args[0], 0)
    fn = _fresh(getattr(_math, name))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the parallel build is parallel
    try:
        serial = _compile._compiled(fn, True)(*args, **kwargs)
        parallel = _compile._compiled(fn, False)(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (serial, parallel))):
        assert torch.equal(a, b), f"{op}: serial and parallel builds differ"


def test_decode_sized_calls_use_the_serial_build(monkeypatch):
    seen = []
    real = _compile._compiled

    def spy(fn, serial=False):
        seen.append((fn.__name__, serial))
        return real(fn, serial)

    monkeypatch.setattr(_compile, "_compiled", spy)
    # Grad mode on (nothing requires grad): the Dynamo builds; no-grad calls take the direct builds,
    # split the same way (tests/test_kernel_direct.py).
    with torch.enable_grad():
        ops.rms_norm(torch.randn(4, 1, 256), torch.ones(256))
        ops.rms_norm(torch.randn(8, 256, 256), torch.ones(256))
    assert seen == [("rms_norm_fwd", True), ("rms_norm_fwd", False)]
