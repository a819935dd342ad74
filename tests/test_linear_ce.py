"""The fused LM head + cross-entropy (``kernels.linear_cross_entropy``) and the models' loss path.

Accuracy criterion: against a float64 reference, the fused op's error (max norm over the result)
must be at most twice that of the unfused composition it replaces (``F.linear`` then
``F.cross_entropy`` in the same dtypes) plus 4 ulps of the result's largest value. Why: both
evaluate the same terms; the fused op only orders and chunks the sums differently (the weight
gradient is summed over chunks in fp32), which changes the rounding, not its size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steadylm import functional
from steadylm import kernels as K
from steadylm.kernels import _math, linear_ce
from steadylm.models import ModelConfig, build_model, takes_targets

VOCAB, D = 1000, 64


@pytest.fixture
def small_chunks(monkeypatch):
    """7 rows per chunk at VOCAB: inputs of 1, 7 and 301 rows take one, one and 43 chunks (the last partial)."""
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 7 * VOCAB)


def _inputs(rows: int, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, D, generator=gen) * scale
    weight = torch.randn(VOCAB, D, generator=gen) * 0.3
    targets = torch.randint(0, VOCAB, (rows,), generator=gen)
    if rows > 3:
        targets[1] = linear_ce.IGNORE_INDEX
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, autocast: bool):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, targets)
    loss.backward()
    return [loss.detach(), h.grad, w.grad]


def _max_err(got, ref64):
    return float((got.double() - ref64).abs().max())


@pytest.mark.parametrize("rows", [1, 7, 301])
@pytest.mark.parametrize("scale", [1.0, 60.0], ids=["ordinary", "logits_to_1e3"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_fused_loss_and_gradients_as_accurate_as_the_unfused_composition(rows, scale, autocast, small_chunks):
    hidden, weight, targets = _inputs(rows, scale, seed=rows)
    ref64 = _loss_and_grads(functional.linear_cross_entropy, hidden.double(), weight.double(), targets, False)
    if autocast:  # the reference sees the operands the bf16 matmuls see
        ref64 = _loss_and_grads(functional.linear_cross_entropy, hidden.bfloat16().double(),
                                weight.bfloat16().double(), targets, False)  # fmt: skip
    fused = _loss_and_grads(K.linear_cross_entropy, hidden, weight, targets, autocast)
    unfused = _loss_and_grads(functional.linear_cross_entropy, hidden, weight, targets, autocast)
    names = ["loss", "d hidden", "d weight"]
    for name, f, u, r in zip(names, fused, unfused, ref64):
        assert f.dtype == u.dtype and f.shape == u.shape, name
        ulp = torch.finfo(u.dtype).eps * float(r.abs().max())
        assert _max_err(f, r) <= 2 * _max_err(u, r) + 4 * ulp, (name, _max_err(f, r), _max_err(u, r))


def test_ignored_targets_add_nothing(small_chunks):
    hidden, weight, targets = _inputs(20, 1.0, seed=3)
    targets[5:9] = linear_ce.IGNORE_INDEX
    kept = targets != linear_ce.IGNORE_INDEX
    full = K.linear_cross_entropy(hidden, weight, targets)
    only_kept = K.linear_cross_entropy(hidden[kept], weight, targets[kept])
    torch.testing.assert_close(full, only_kept, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


def test_every_target_ignored_gives_what_f_cross_entropy_gives():
    hidden, weight, _ = _inputs(6, 1.0, seed=2)
    targets = torch.full((6,), linear_ce.IGNORE_INDEX)
    fused = _loss_and_grads(K.linear_cross_entropy, hidden, weight, targets, False)
    unfused = _loss_and_grads(functional.linear_cross_entropy, hidden, weight, targets, False)
    assert fused[0].isnan() and unfused[0].isnan()  # 0/0
    assert torch.equal(fused[1], unfused[1]) and torch.equal(fused[2], unfused[2])  # zero gradients


def test_gradcheck_float64(monkeypatch):
    vocab = 20
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 2 * vocab)  # 9 rows: 5 chunks, the last of 1 row
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(vocab, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, vocab, (9,), generator=gen)
    t[4] = linear_ce.IGNORE_INDEX
    assert torch.autograd.gradcheck(lambda h, w: K.linear_cross_entropy(h, w, t), (h, w))


def test_the_accuracy_check_rejects_a_gradient_without_the_one_hot(monkeypatch, small_chunks):
    exact = _math.cross_entropy_chunk

    def softmax_only(logits, targets, valid, grad_scale, *, need_grad, grad_dtype):  # the mutant: no one-hot
        out = exact(logits, targets, valid, grad_scale, need_grad=need_grad, grad_dtype=grad_dtype)
        if not need_grad:
            return out
        probs = torch.softmax(logits.float(), dim=-1) * torch.where(valid[:, None], grad_scale, 0.0)
        return out[0], probs.to(grad_dtype)

    monkeypatch.setattr(_math, "cross_entropy_chunk", softmax_only)
    with pytest.raises(AssertionError, match="d hidden"):
        test_fused_loss_and_gradients_as_accurate_as_the_unfused_composition(7, 1.0, False, None)


def test_bad_shapes_name_the_argument():
    hidden, weight, targets = _inputs(4, 1.0, seed=0)
    with pytest.raises(ValueError, match="weight must have shape"):
        K.linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        K.linear_cross_entropy(hidden, weight, targets[:-1])


def test_no_grad_returns_the_same_loss_without_gradients(small_chunks):
    hidden, weight, targets = _inputs(30, 1.0, seed=1)
    with torch.no_grad():
        loss, d_hidden, d_weight = linear_ce._linear_ce(hidden, weight, targets, torch.float32, False)
    assert d_hidden.numel() == 0 and d_weight.numel() == 0
    assert torch.equal(loss, K.linear_cross_entropy(hidden.requires_grad_(), weight, targets).detach())


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_model_loss_equals_the_cross_entropy_of_its_logits(impl):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("nano", activation="powlu", norm="bhyt", impl=impl))
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    assert takes_targets(model) and not takes_targets(nn.Linear(2, 2))
    loss = model(inputs, targets=targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(inputs)
    ref = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    # The same terms in another order: a few fp32 ulps of the loss and of each gradient's largest value.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(loss, ref, rtol=8 * eps, atol=0)
    for g, r in zip(grads, ref_grads):
        assert float((g - r).abs().max()) <= 16 * eps * float(r.abs().max()) + 1e-12


def test_compiled_model_with_targets_has_no_graph_break_and_the_same_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("nano"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    explained = torch._dynamo.explain(model)(tokens[:, :-1], targets=tokens[:, 1:])
    assert explained.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(tokens[:, :-1], targets=tokens[:, 1:]),
                               model(tokens[:, :-1], targets=tokens[:, 1:]), rtol=1e-6, atol=0)  # fmt: skip


def test_a_head_that_is_not_a_plain_linear_keeps_its_own_forward():
    class Doubled(nn.Linear):  # e.g. an FP8-converted head: a Linear subclass with its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("nano", tie_embeddings=False))
    head = Doubled(model.config.dim, model.config.vocab_size, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    logits = model(tokens[:, :-1])
    ref = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert torch.equal(model(tokens[:, :-1], targets=tokens[:, 1:]), ref)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_fused_loss_on_each_device_as_accurate_as_the_unfused_composition(autocast, device, small_chunks):
    # The device variant of the float64 check (CUDA under `make gpu-check`): same criterion.
    hidden, weight, targets = (t.to(device) for t in _inputs(301, 1.0, seed=5))
    cast = (lambda t: t.bfloat16().double()) if autocast else (lambda t: t.double())

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w, targets)
        loss.backward()
        return [loss.detach(), h.grad, w.grad]

    ref64 = run(functional.linear_cross_entropy, cast(hidden), cast(weight))
    fused = run(K.linear_cross_entropy, hidden, weight)
    unfused = run(functional.linear_cross_entropy, hidden, weight)
    for name, f, u, r in zip(["loss", "d hidden", "d weight"], fused, unfused, ref64):
        assert f.device.type == device and f.dtype == u.dtype, name
        ulp = torch.finfo(u.dtype).eps * float(r.abs().max())
        assert _max_err(f, r) <= 2 * _max_err(u, r) + 4 * ulp, (name, _max_err(f, r), _max_err(u, r))
