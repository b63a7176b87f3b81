"""Muon's orthogonalization against the SVD and the plain iteration; MuonAdamW against PyTorch's
AdamW and Muon; the parameter split; resuming from a state dict."""

import copy

import pytest
import torch
from torch import nn

from llmscratch.errors import ConfigError
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.nn.optim import NS_COEFFICIENTS, MuonAdamW, muon_param_groups, orthogonalize
from llmscratch.training.config import TrainConfig
from llmscratch.training.step import build_optimizer


def plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The textbook iteration on x itself (Muon's reference form), in float64."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 32), (3, 32, 80)])
def test_orthogonalize_matches_the_plain_iteration(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    torch.testing.assert_close(out.double(), plain_newton_schulz(g), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 32)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_singular_values(shape):
    gen = torch.Generator().manual_seed(1)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -1.5, r, dtype=torch.float64)  # singular values spread over 30×
    vh = v.mT
    out = orthogonalize((u @ torch.diag(s) @ vh).float()).double()
    inner = u.mT @ out @ vh.mT  # diagonal when out = U·f(S)·Vᵀ
    diag = torch.diagonal(inner)
    off = inner - torch.diag(diag)
    assert off.norm() < 1e-4 * diag.norm()
    assert diag.min() > 0.6 and diag.max() < 1.25  # singular values pushed towards 1


def test_orthogonalize_does_a_stack_like_one_at_a_time():
    g = torch.randn(4, 40, 24, generator=torch.Generator().manual_seed(2))
    together = orthogonalize(g)
    for i in range(4):
        torch.testing.assert_close(together[i], orthogonalize(g[i]), atol=1e-6, rtol=1e-5)


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_adamw_groups_match_pytorch_adamw():
    torch.manual_seed(3)
    ours_p = [nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(5))]
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = MuonAdamW([{"params": ours_p[:1], "weight_decay": 0.3}, {"params": ours_p[1:], "weight_decay": 0.0}],
                     lr=1e-2, betas=(0.8, 0.99))
    ref = torch.optim.AdamW([{"params": ref_p[:1], "weight_decay": 0.3}, {"params": ref_p[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.99))
    for step in range(5):
        _grads(ours_p, step)
        _grads(ref_p, step)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in PyTorch 2.9")
def test_muon_groups_match_pytorch_muon():
    """PyTorch's Muon with Moonshot's learning-rate scaling is the same update, except that it
    orthogonalizes in bfloat16: agree to bfloat16 accuracy."""
    torch.manual_seed(4)
    start = [torch.randn(32, 96) * 0.02, torch.randn(64, 32) * 0.02]
    ours_p = [nn.Parameter(t.clone()) for t in start]
    ref_p = [nn.Parameter(t.clone()) for t in start]
    ours = MuonAdamW([{"params": ours_p, "algorithm": "muon", "weight_decay": 0.1}], lr=1e-2, momentum=0.9)
    ref = torch.optim.Muon(ref_p, lr=1e-2, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        _grads(ours_p, step)
        _grads(ref_p, step)
        ours.step()
        ref.step()
    for a, b, s in zip(ours_p, ref_p, start):
        moved = (b.detach() - s).abs().max()
        assert (a.detach() - b.detach()).abs().max() < 0.03 * moved


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(4))], "algorithm": "muon"}])
    with pytest.raises(ValueError, match="algorithm"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(4))], "algorithm": "sgd"}])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied, pos_emb):
    model = GPT(GPTConfig.from_preset("test", tie_weights=tied, pos_emb=pos_emb, bias=True))
    groups = muon_param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw, vectors = ({names[id(p)] for p in g["params"]} for g in groups)
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "tok_emb.weight" in adamw and ("out_head.weight" in adamw) != tied
    assert ("pos_emb.weight" in adamw) == (pos_emb == "learned")
    assert all(model.get_parameter(n).dim() == 1 for n in vectors)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.2, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_parameters()


def test_build_optimizer_picks_by_config():
    model = GPT(GPTConfig.from_preset("test"))
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")), MuonAdamW)
    assert type(build_optimizer(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="--optimizer adamw"):
        TrainConfig(fsdp=True)  # Muon is the default and needs whole matrices


def test_state_dict_resumes_exactly():
    torch.manual_seed(5)
    model = GPT(GPTConfig.from_preset("test"))
    x = torch.randint(0, 256, (2, 16))

    def run(m: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            m(x, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    straight = copy.deepcopy(model)
    opt = MuonAdamW(muon_param_groups(straight, 0.1), lr=1e-2)
    run(straight, opt, 4)

    first = copy.deepcopy(model)
    opt = MuonAdamW(muon_param_groups(first, 0.1), lr=1e-2)
    run(first, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    second = copy.deepcopy(first)
    opt2 = MuonAdamW(muon_param_groups(second, 0.1), lr=1e-2)
    opt2.load_state_dict(saved)
    run(second, opt2, 2)
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_muon_on_cuda_matches_the_cpu():
    """The same steps on the GPU (TF32 products allowed, as the runtime sets) as on the CPU."""
    torch.manual_seed(6)
    model = GPT(GPTConfig.from_preset("test"))
    x = torch.randint(0, 256, (2, 16))
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        opt = MuonAdamW(muon_param_groups(m, 0.1), lr=1e-2)
        for _ in range(3):
            m(x.to(device), x.to(device)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append({n: p.detach().cpu() for n, p in m.named_parameters()})
    for name, p in results[0].items():
        torch.testing.assert_close(results[1][name], p, atol=2e-3, rtol=2e-3, msg=name)
