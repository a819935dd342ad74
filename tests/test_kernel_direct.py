"""Forward-only fused calls run *direct builds* (``kernels._compile.forward``).

In an eager decode step each fused op has a few microseconds of work, and Dynamo's frame
evaluation and guards around the compiled kernel cost more than that. With grad mode off on CPU
the forward kernel is traced once to an ATen graph and compiled by Inductor without Dynamo; the
build is keyed on everything it specialises on, so it needs no guards. These tests hold it to the
Dynamo build's exact bits, to one build for every row count, and to its limits (gradients,
compiled models, non-contiguous inputs and other devices take the Dynamo build).
"""

from __future__ import annotations

import math

import pytest
import torch

from steadylm.kernels import _compile, _math, ops

pytestmark = pytest.mark.skipif(
    not _compile.compile_enabled(), reason="fused kernels run eagerly (STEADYLM_COMPILE_KERNELS=0)"
)

D = 96  # not a multiple of the 16-lane vector: the builds' tail loops run too


def _rows(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` rows of width D, with huge and tiny rows among them (the norms' rescue paths)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    if n >= 3:
        x[1] *= 1e30 if dtype == torch.float32 else 1e20
        x[2] *= 1e-30 if dtype == torch.float32 else 1e-20
    return x.to(dtype)


def _cases(dtype: torch.dtype, n: int) -> dict[str, tuple]:
    x = _rows(n, dtype, 0)
    gate, up = _rows(n, dtype, 1).clamp(-40, 40), _rows(n, dtype, 2).clamp(-40, 40)
    w = (1.0 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(3))).to(dtype)
    variance = torch.rand(n, 1, generator=torch.Generator().manual_seed(4)) + 0.5
    lam = torch.tensor(1.7)
    return {
        "swiglu": (ops.swiglu, gate, up),
        "powlu_glu": (ops.powlu_glu, gate, up, 3.0),
        "swiglu_clip gptoss": (ops.swiglu_clip, gate, up, 7.0, "gptoss", 1.702),
        "swiglu_clip clamp": (ops.swiglu_clip, gate, up, 5.0, "clamp"),
        "rms_norm": (ops.rms_norm, x, w, 1e-6),
        "rms_norm no weight": (ops.rms_norm, x, None, 1e-6),
        "mean_square": (ops.mean_square, x),
        "dyt": (ops.dyt, x, w, torch.tensor(0.8), w * 0.1),
        "bhyt": (ops.bhyt, x, w, lam, 10.0, 1e-6),
        "bhyt variance": (ops.bhyt, x, w, lam, 10.0, 1e-6, variance),
        "bhyt_and_mean_square": (ops.bhyt_and_mean_square, x, w, lam, 10.0, 1e-6),
    }


def _flat(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


# Each case compiles every forward op twice (Dynamo and direct, ~15 s cold): bf16 runs its serial
# build in the default suite, and its 1-row and parallel builds under -m slow.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "dtype, n",
    [
        (torch.float32, 1),
        (torch.float32, 5),
        (torch.float32, 400),
        (torch.bfloat16, 5),
        pytest.param(torch.bfloat16, 1, marks=_SLOW),
        pytest.param(torch.bfloat16, 400, marks=_SLOW),
    ],
    ids=["fp32-1row", "fp32-5rows", "fp32-400rows", "bf16-5rows", "bf16-1row", "bf16-400rows"],
)
def test_direct_builds_give_the_dynamo_builds_bits(dtype, n):
    # 400 × 96 elements is above SERIAL_BELOW: the parallel build; 1 and 5 rows: the serial one
    # (a 1-row call: Dynamo specialises the row count, the direct build keeps it symbolic).
    assert _direct_builds_that_differ(dtype, n) == []


def _direct_builds_that_differ(dtype: torch.dtype, n: int) -> list[str]:
    """The cases whose direct build's outputs are not the Dynamo build's, bit for bit."""
    differ = []
    for name, (op, *args) in _cases(dtype, n).items():
        with torch.enable_grad():  # nothing requires grad: the forward kernel through Dynamo
            dynamo = _flat(op(*args))
        with torch.no_grad():  # the direct build
            direct = _flat(op(*args))
        same = all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(direct, dynamo))
        if not same or len(direct) != len(dynamo):
            differ.append(name)
    return differ


def test_the_bits_check_rejects_a_direct_build_one_ulp_off(monkeypatch):
    # The mutant: every direct build's first output moved by one ulp at one element.
    real = _compile._build_direct

    def one_ulp_off(*build_args):
        compiled, single = real(*build_args)

        def nudged(tensors):
            out = list(compiled(tensors))
            first = out[0].clone()
            flat = first.view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
            out[0] = first
            return tuple(out)

        return nudged, single

    monkeypatch.setattr(_compile, "_build_direct", one_ulp_off)
    monkeypatch.setattr(_compile, "_DIRECT", {})
    assert _direct_builds_that_differ(torch.float32, 5) == list(_cases(torch.float32, 5))


def test_direct_devices_come_from_the_environment_setting():
    assert _compile._direct_devices("cpu") == {"cpu"}
    assert _compile._direct_devices(" cpu, CUDA ,") == {"cpu", "cuda"}
    assert _compile._direct_devices("") == frozenset()
    import os
    import subprocess
    import sys

    env = {**os.environ, "STEADYLM_DIRECT_DEVICES": "cpu,cuda"}
    code = "from steadylm.kernels import _compile; print(sorted(_compile.DIRECT_DEVICES))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['cpu', 'cuda']"


#: The CUDA direct builds' allowed difference from the Dynamo builds, relative to the row's largest
#: value. Measured on an H200 (torch 2.11): the elementwise ops give the same bits, the norms do not.
#: Inductor picks a CUDA reduction's block sizes and warps from its size hints (the direct build is
#: traced once with the rows symbolic, the Dynamo build is specialised or hinted differently), so
#: Σx² over D terms is summed in another tree order. Each tree sum is within ⌈log2 D⌉·U32 of the
#: true sum (all terms ≥ 0), the two within twice that; r = rsqrt(·) halves it, mean_square keeps
#: it; +2 for the roundings after. bf16 outputs may also round to the other neighbour: 2^-7.
_REDUCTION_ULPS = 2 * math.ceil(math.log2(D)) + 2
_REDUCES = {"rms_norm", "rms_norm no weight", "mean_square", "bhyt", "bhyt_and_mean_square"}


def _cuda_direct_difference(name: str, direct: torch.Tensor, dynamo: torch.Tensor) -> float:
    """max |direct − dynamo| over the allowed difference (≤ 1 passes); NaN/inf must match exactly."""
    assert torch.equal(direct.isnan(), dynamo.isnan()) and torch.equal(direct.isinf(), dynamo.isinf()), name
    finite = dynamo.isfinite()
    assert torch.equal(direct[~finite & ~dynamo.isnan()], dynamo[~finite & ~dynamo.isnan()]), name
    a, b = direct.double().where(finite, 0.0), dynamo.double().where(finite, 0.0)
    if name not in _REDUCES:
        return 0.0 if torch.equal(a, b) else math.inf
    row_max = b.abs().amax(dim=-1, keepdim=True)
    rel = _REDUCTION_ULPS * 2.0**-24 + (2.0**-7 if dynamo.dtype == torch.bfloat16 else 0.0)
    allowed = row_max * rel + torch.finfo(dynamo.dtype).smallest_normal  # rows of zeros / subnormals
    return float(((a - b).abs() / allowed).max())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_direct_builds_opted_in_agree_with_the_dynamo_builds(dtype, monkeypatch):
    # CUDA keeps the Dynamo builds by default; STEADYLM_DIRECT_DEVICES=cpu,cuda opts it in. Opted
    # in, its direct builds must give the Dynamo builds' bits for the elementwise ops and differ
    # only by the reductions' summation order for the norms (_REDUCTION_ULPS).
    monkeypatch.setattr(_compile, "DIRECT_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_compile, "_DIRECT", {})
    for n in (1, 5, 400):
        for name, (op, *args) in _cases(dtype, n).items():
            args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            with torch.enable_grad():
                dynamo = _flat(op(*args))
            with torch.no_grad():
                direct = _flat(op(*args))
            for a, b in zip(direct, dynamo):
                assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, name
                assert _cuda_direct_difference(name, a, b) <= 1.0, (name, n)
    assert any(isinstance(part, tuple) and torch.device("cuda", 0) in part for key in _compile._DIRECT for part in key)


def test_the_cuda_agreement_check_rejects_a_wrong_statistic_and_one_flipped_activation_bit():
    # Runs anywhere: the check itself, on CPU tensors.
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    w = torch.ones(D)
    good = ops.rms_norm(x, w, 1e-6)
    assert _cuda_direct_difference("rms_norm", good, good) == 0.0
    # A statistic off by 1e-5 relative (a wrong reduction, e.g. one term dropped of 96 would be ~1%).
    assert _cuda_direct_difference("rms_norm", good * (1 + 1e-5), good) > 1.0
    act = ops.swiglu(x, x)
    flipped = act.clone()
    flipped.view(-1)[3] = torch.nextafter(flipped.view(-1)[3], torch.tensor(float("inf")))
    assert _cuda_direct_difference("swiglu", flipped, act) == math.inf


def _builds(fn) -> list[tuple]:
    return [key for key in _compile._DIRECT if key[0] is fn]


def test_one_direct_build_serves_every_row_count():
    w = torch.ones(D)
    with torch.no_grad():
        ops.rms_norm(torch.randn(3, D), w)
        before = len(_builds(_math.rms_norm_fwd))
        for rows in (1, 2, 7, 33, 64):
            ops.rms_norm(torch.randn(rows, 1, D), w)
    assert before >= 1 and len(_builds(_math.rms_norm_fwd)) == before


def test_direct_builds_are_serial_below_the_grain_size(monkeypatch):
    monkeypatch.setattr(_compile, "_DIRECT", {})
    w = torch.ones(256)
    with torch.no_grad():
        ops.rms_norm(torch.randn(4, 1, 256), w)
        ops.rms_norm(torch.randn(8, 256, 256), w)
    assert [key[1] for key in _compile._DIRECT] == [True, False]  # (fn, serial, ...)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread: every build is serial")
def test_direct_builds_above_the_grain_size_run_on_every_thread(monkeypatch):
    # Inductor sizes its OpenMP region by the example's rows. Traced with 2 rows, as every build
    # was, the parallel build's code was single-threaded: the training forwards (a custom op's
    # body is a direct build) ran on one core. The norm and a flattened (1-D) gated op. Compiled
    # afresh: Inductor's FX graph cache keys on the graph, not on the example's row count.
    monkeypatch.setattr(_compile, "_DIRECT", {})
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        ops.rms_norm(torch.randn(4, 1, 256), torch.ones(256))
        ops.rms_norm(torch.randn(300, 256), torch.ones(256))
        ops.swiglu(torch.randn(300, 256), torch.randn(300, 256))
    parallel = {(key[0].__name__, key[1]): "#pragma omp" in build.source_code for key, (build, _) in _compile._DIRECT.items()}
    assert parallel == {("rms_norm_fwd", True): False, ("rms_norm_fwd", False): True, ("swiglu_fwd", False): True}


def test_grad_mode_compiled_models_and_strided_inputs_take_the_dynamo_build(monkeypatch):
    built = []
    real = _compile._build_direct

    def spy(fn, *rest):
        built.append(fn.__name__)
        return real(fn, *rest)

    monkeypatch.setattr(_compile, "_build_direct", spy)
    monkeypatch.setattr(_compile, "_DIRECT", {})
    w = torch.ones(D)
    with torch.enable_grad():
        ops.rms_norm(torch.randn(4, D), w)  # grad mode on, nothing requires grad: the Dynamo build
    with torch.no_grad():
        ops.rms_norm(torch.randn(D, 8).t(), w)  # rows not contiguous
        ops.rms_norm(torch.randn(0, D), w)  # no rows

        @torch.compile(fullgraph=True)
        def compiled(t):
            return ops.rms_norm(t, w) * 2

        compiled(torch.randn(4, D))  # traced into the outer graph
    assert built == []
    with torch.no_grad():
        ops.rms_norm(torch.randn(4, D), w)
    assert built == ["rms_norm_fwd"]


def test_the_custom_ops_forward_runs_the_direct_build(monkeypatch):
    # Autograd runs a custom op's body with grad mode off, so a training forward takes the direct
    # build too (its bits are the Dynamo build's: above); the backward kernels keep Dynamo's.
    monkeypatch.setattr(_compile, "_DIRECT", {})
    x = torch.randn(4, D, requires_grad=True)
    w = torch.ones(D, requires_grad=True)
    ops.rms_norm(x, w).sum().backward()
    assert [key[0].__name__ for key in _compile._DIRECT] == ["rms_norm_fwd"]
    assert x.grad is not None and w.grad is not None


def test_switched_off_and_on_give_the_same_bits(monkeypatch):
    x, w = _rows(6, torch.float32, 5), torch.ones(D)
    with torch.no_grad():
        direct = ops.bhyt_and_mean_square(x, w, 2.0)
        monkeypatch.setattr(_compile, "_direct_enabled", False)
        monkeypatch.setattr(_compile, "_build_direct", None)  # would fail if reached
        dynamo = ops.bhyt_and_mean_square(x, w, 2.0)
    for a, b in zip(direct, dynamo):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_fused_ops_run_their_aten_math_under_a_dispatch_mode(grad_mode):
    # Fake tensors (shape inference, meta-device init) and make_fx must see the kernels' ATen ops.
    # Before, a compiled kernel was called on the fake tensors, read their missing data and crashed
    # the process (SIGSEGV).
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with torch.set_grad_enabled(grad_mode):
        with FakeTensorMode():
            for name, (op, *args) in _cases(torch.float32, 5).items():
                for out in _flat(op(*args)):
                    assert isinstance(out, FakeTensor) and out.shape[0] == 5, name
    # make_fx traces through the op (its proxy mode is a dispatch mode): the kernel's math is in
    # the graph, and the graph computes what the op does.
    from torch.fx.experimental.proxy_tensor import make_fx

    gate, up = torch.randn(5, D), torch.randn(5, D)
    with torch.set_grad_enabled(grad_mode):
        graph = make_fx(ops.swiglu)(gate, up)
        expected = ops.swiglu(gate, up)
    assert any("sigmoid" in str(node.target) for node in graph.graph.nodes)
    assert torch.equal(graph(gate, up), expected)


def test_fused_ops_under_vmap_give_the_per_sample_results():
    # torch.func's wrapped tensors have no storage for a direct build to read: they take Dynamo's.
    x, w = torch.randn(3, 4, D), torch.ones(D)
    with torch.no_grad():
        batched = torch.vmap(lambda t: ops.rms_norm(t, w))(x)
        per_sample = torch.stack([ops.rms_norm(x[i], w) for i in range(3)])
    # Under vmap the kernel runs through batching rules (another rounding order than the fused
    # kernel's): each element within 4 fp32 ulps of its magnitude (measured: 2).
    torch.testing.assert_close(batched, per_sample, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("mode", ["no_grad", "grad", "requires_grad"])
def test_forward_mode_ad_carries_the_tangent_through_every_fused_op(mode):
    # A compiled kernel drops the tangent of a dual input: with grad mode off every op returned
    # none, silently; with an input that requires grad the custom op raised (it has no JVP). Under
    # an open dual level the ops run their kernels' ATen math, which carries tangents forward and
    # gradients back.
    import torch.autograd.forward_ad as fwAD

    from steadylm import functional

    def within_4_ulps_of_the_row(got: torch.Tensor, expected: torch.Tensor) -> bool:
        # fp32 math against float64: a norm's tangent or gradient sums D products per row, so an
        # element's error scales with the row's largest value: within 4 fp32 ulps of it (measured:
        # 1.6 for tangents).
        scale = expected.abs().amax(dim=-1, keepdim=True).float()
        return bool(((got - expected.float()).abs() <= 4 * torch.finfo(torch.float32).eps * scale).all())

    tangent = torch.randn(2, D, generator=torch.Generator().manual_seed(7))
    for name, (op, first, *rest) in _cases(torch.float32, 2).items():
        reference = getattr(functional, op.__name__)
        rest64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in rest]

        def ref(x64: torch.Tensor) -> torch.Tensor:
            return _flat(reference(x64, *rest64))[0]

        _, expected = torch.func.jvp(ref, (first.double(),), (tangent.double(),))
        x = first.clone().requires_grad_(mode == "requires_grad")
        with torch.set_grad_enabled(mode != "no_grad"), fwAD.dual_level():
            out = _flat(op(fwAD.make_dual(x, tangent), *rest))[0]
            got = fwAD.unpack_dual(out).tangent
        assert got is not None and within_4_ulps_of_the_row(got, expected), name
        if mode == "requires_grad":
            cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
            out.backward(cotangent)
            x64 = first.double().requires_grad_()
            ref(x64).backward(cotangent.double())
            assert x.grad is not None and within_4_ulps_of_the_row(x.grad, x64.grad), name


def test_a_build_traced_under_autocast_is_kept_apart(monkeypatch):
    monkeypatch.setattr(_compile, "_DIRECT", {})
    x, w = torch.randn(4, D), torch.ones(D)
    with torch.no_grad():
        plain = ops.rms_norm(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = ops.rms_norm(x, w)
    assert [key[4] for key in _compile._DIRECT] == [None, torch.bfloat16]
    assert torch.equal(plain, under)  # the kernels use no autocast-listed op: same graph, same bits

