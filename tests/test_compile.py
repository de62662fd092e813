"""torch.compile: the delta path traces without graph breaks; compiled training matches eager."""

from __future__ import annotations

import pytest
import torch

import gpart
from gpart import _delta
from gpart.partition import hash_base

transformers = pytest.importorskip("transformers")
needs_compiler = pytest.mark.skipif(
    not _delta.compiled_available(), reason="torch.compile cannot build kernels here"
)


def _tiny_llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize(("backend", "dropout", "d"), [("eager", 0.1, 100), ("compiled", 0.0, 128)])
def test_whole_model_traces_without_graph_breaks(backend, dropout, d):
    if backend == "compiled" and not _delta.compiled_available():
        pytest.skip("no compiled kernel here")
    model = gpart.apply(_tiny_llama(), d=d, seed=1, backend=backend, dropout=dropout).train()
    ids = torch.randint(0, 64, (2, 12))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@needs_compiler
def test_compiled_training_matches_eager():
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    thetas, losses = [], []
    for compiled in (False, True):
        model = gpart.apply(_tiny_llama(layers=1), d=100, seed=1)
        step_model = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW([gpart.theta(model)], lr=1e-2)
        run = []
        for _ in range(3):
            loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        thetas.append(gpart.theta(model).detach().clone())
        losses.append(run)
    assert thetas[0].abs().sum() > 0
    torch.testing.assert_close(thetas[1], thetas[0], rtol=1e-4, atol=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("d", [1000, 1024])  # the general modulo and the power-of-two mask
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_traced_formula_is_the_eager_kernel(dropout, d):
    torch.manual_seed(0)
    w0, scale = torch.randn(37, 29), torch.rand(d)
    grads = []
    outs = []
    for fn in ("eager", "traced"):
        theta = torch.randn(d, generator=torch.Generator().manual_seed(1)).requires_grad_()
        if fn == "eager":
            out = _delta.effective(w0, theta, scale, start=2**40, seed=-5, dropout=dropout, dropout_key=12345)
        else:
            key, base = torch.tensor(12345), torch.tensor(hash_base(-5, 2**40))
            out = _delta.traced(w0, theta, scale, base=base, start=2**40, dropout=dropout, dropout_key=key)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        outs.append(out)
        grads.append(theta.grad)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)  # summation order may differ
