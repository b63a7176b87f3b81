"""``training.step.train_step``: one optimizer step, the one ``train``, the experiments and ``bench`` share."""

from __future__ import annotations

import copy

import pytest
import torch

from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.training.config import TrainConfig
from llmscratch.training.step import build_optimizer, set_lr, train_step

CFG = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (n, CFG.context_length + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]  # (n, T) each


def gradients_of_one_step(split: list[int]) -> tuple[list[torch.Tensor], float]:
    """The gradients train_step accumulates over micro-batches of these sizes (of one 4-window batch)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    x, y = batch(sum(split))
    micro = list(zip(x.split(split), y.split(split)))
    seen: list[torch.Tensor] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train_step(model, model.parameters(), opt, micro, grad_clip=0.0,
                        before_clip=lambda: seen.extend(p.grad.clone() for p in model.parameters()))
    return seen, result.loss.item()


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch():
    """Micro-batches of 2 + 2 or 1 × 4 windows accumulate the same gradient and mean loss as 4 at once.

    Read before clipping or an optimizer could hide a wrongly scaled gradient; the mean loss of
    equal micro-batches is the mean over the batch, so each micro-batch's loss must be divided by
    their number (without it the gradient is 2× or 4× too large, and this fails).
    """
    whole, whole_loss = gradients_of_one_step([4])
    for split in ([2, 2], [1, 1, 1, 1]):
        grads, loss = gradients_of_one_step(split)
        for a, b in zip(grads, whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert loss == pytest.approx(whole_loss, rel=1e-6), split


def test_two_steps_equal_the_steps_written_out():
    """Two steps of train_step (AdamW, clipping, lr set per step) leave the weights that forward,
    backward, clip_grad_norm_ and AdamW.step written out by hand leave."""
    torch.manual_seed(0)
    ours = GPT(CFG)
    theirs = copy.deepcopy(ours)
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=0.5)
    opt_ours = build_optimizer(ours, cfg, torch.device("cpu"))
    opt_theirs = build_optimizer(theirs, cfg, torch.device("cpu"))
    for step, lr in enumerate([1e-2, 5e-3]):
        x, y = batch(3, seed=step)
        set_lr(opt_ours, lr)
        result = train_step(ours, ours.parameters(), opt_ours, [(x, y)], grad_clip=cfg.grad_clip)
        for group in opt_theirs.param_groups:
            group["lr"] = lr
        loss = theirs(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.grad_clip)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        assert result.loss.item() == pytest.approx(loss.item(), rel=1e-6)
        assert float(result.grad_norm) == pytest.approx(float(norm), rel=1e-6)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in ours.parameters())  # zeroed for the next step


def test_no_clipping_returns_no_norm_and_a_step_needs_no_host_sync():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_step(model, model.parameters(), opt, [batch(2)], grad_clip=0.0)
    assert result.grad_norm is None
    assert isinstance(result.loss, torch.Tensor) and result.loss.dim() == 0 and not result.loss.requires_grad


def test_train_the_experiments_and_bench_all_step_through_train_step(monkeypatch, tmp_path):
    """One step function for every training loop of the project: each of the three calls it."""
    import llmscratch.training.step as step_module
    from llmscratch.runtime import setup_runtime
    from llmscratch.tools import bench
    from llmscratch.tools.experiments.common import SIZES, fresh_model, load_data, train_model, validation_batches
    import llmscratch.training.loop as loop_module

    calls: list[str] = []
    real = step_module.train_step

    def counting(who: str):
        def step(*args, **kwargs):
            calls.append(who)
            return real(*args, **kwargs)
        return step

    monkeypatch.setattr(step_module, "train_step", counting("step module"))
    monkeypatch.setattr(loop_module, "train_step", counting("train"))
    size = SIZES["tiny"]
    runtime = setup_runtime("cpu")
    data = load_data(size, tmp_path)
    model = fresh_model(size.model_config(data.vocab_size), 0, runtime)
    train_model(model, data, runtime, steps=2, batch_size=2, lr=1e-3, seed=0, eval_every=2,
                val_batches=validation_batches(data, size.context_length, 2, seed=0))
    assert calls == ["step module"] * 2  # the experiments
    calls.clear()
    bench.bench_train(GPTConfig.from_preset("test"), torch.device("cpu"), batch=2, context=16, precision="fp32",
                      names=["ours"], steps=1, repeats=1, warmup=1, log=lambda *_: None)
    assert calls and set(calls) == {"step module"}  # bench
