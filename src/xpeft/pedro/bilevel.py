"""Bi-level training of PEDRO's rational activation: its coefficients learn on a held-out split, the rest on the
training split.

The PEDRO group's sibling papers learn the rational activation's coefficients by bi-level optimisation: the
coefficients are updated on a held-out split at learning rate 1e-6, alternating with the other parameters, which are
updated on the training split. [`BilevelTrainer`] does this with transformers' `Trainer`; [`activation_step`] is the
held-out update on its own, for hand-written loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import cycle

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .generator import RationalActivation


def rational_coefficients(model: nn.Module) -> list[nn.Parameter]:
    """The coefficients of every rational activation in `model` (all adapters), in module order."""
    return [p for module in model.modules() if isinstance(module, RationalActivation) for p in module.parameters()]


@contextmanager
def coefficients_trainable(coefficients: list[nn.Parameter], trainable: bool) -> Iterator[None]:
    """Set `requires_grad` of `coefficients` to `trainable` inside the block, and restore it after."""
    before = [p.requires_grad for p in coefficients]
    for p in coefficients:
        p.requires_grad_(trainable)
    try:
        yield
    finally:
        for p, flag in zip(coefficients, before, strict=True):
            p.requires_grad_(flag)


def activation_step(
    loss_of: Callable[[], torch.Tensor], coefficients: list[nn.Parameter], optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One held-out update: `loss_of()` (a forward on a held-out batch), gradients for `coefficients` only (the
    `.grad` of every other parameter is left as it is), then `optimizer.step()` on them. Returns the detached loss."""
    with coefficients_trainable(coefficients, True):
        loss = loss_of()
        grads = torch.autograd.grad(loss, coefficients, allow_unused=True)
    for p, grad in zip(coefficients, grads, strict=True):
        p.grad = grad  # None (a coefficient the loss does not reach): the optimizer skips it
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class BilevelTrainer(Trainer):
    """A `Trainer` that learns PEDRO's rational activation coefficients on a held-out split (bi-level training).

    The PEDRO group's sibling papers describe it as: the rational coefficients are updated on a held-out split at
    learning rate 1e-6, alternating with the other parameters on the training split. Here:

    - the coefficients of every [`RationalActivation`] in the model are left out of the main optimizer and get no
      gradient from training batches (their `requires_grad` is off while `train()` runs, and restored after);
    - after every `activation_every`-th optimizer step (each counting all its gradient-accumulation micro-batches),
      one batch of `activation_dataset` (its loss, through `compute_loss`) updates only the coefficients, with their
      own optimizer `activation_optimizer_cls(coefficients, lr=activation_lr)` (default Adam at the paper's 1e-6);
      the other parameters' gradients are not touched by it;
    - held-out batches come from `get_eval_dataloader(activation_dataset)` (eval batch size and collator, its order),
      cycled as long as training runs.

    The coefficients are ordinary adapter weights: `save_pretrained` and checkpoints hold them as with `Trainer`
    (a checkpoint taken after step s holds the coefficients after that step's held-out update). The held-out
    optimizer's state is not written to checkpoints: a resumed run restarts it (Adam's moments from zero).

    Args:
        activation_dataset (`torch.utils.data.Dataset`): The held-out split, in the format of the training data.
        activation_lr (`float`): Learning rate of the coefficients (the papers' 1e-6).
        activation_every (`int`): Run one held-out update after every this many optimizer steps.
        activation_optimizer_cls (`type[torch.optim.Optimizer]`): The coefficients' optimizer class, called as
            `cls(params, lr=activation_lr)`.
    """

    def __init__(
        self,
        *args,
        activation_dataset: torch.utils.data.Dataset,
        activation_lr: float = 1e-6,
        activation_every: int = 1,
        activation_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
        **kwargs,
    ) -> None:
        if not isinstance(activation_every, int) or isinstance(activation_every, bool) or activation_every < 1:
            raise ValueError(f"`activation_every` must be a positive integer, got {activation_every!r}.")
        if not activation_lr > 0:
            raise ValueError(f"`activation_lr` must be positive, got {activation_lr!r} (the papers use 1e-6).")
        super().__init__(*args, **kwargs)
        self.coefficients = [p for p in rational_coefficients(self.model) if p.requires_grad]
        if not self.coefficients:
            raise ValueError(
                "BilevelTrainer found no trainable rational activation in the model: it trains PEDRO's rational "
                "coefficients on `activation_dataset`. Use a PEDRO adapter with activation='rational' (the default), "
                "or the plain `Trainer` for joint training."
            )
        if self.optimizer is not None:
            # An optimizer passed in was built before the coefficients could be left out of it.
            passed = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if passed & {id(p) for p in self.coefficients}:
                raise ValueError(
                    "The optimizer passed to BilevelTrainer updates the rational activation's coefficients, which "
                    "bi-level training updates only on `activation_dataset`. Build it without them (see "
                    "`xpeft.pedro.rational_coefficients`), or let the trainer create it."
                )
        self.activation_dataset = activation_dataset
        self.activation_every = activation_every
        self.activation_optimizer = activation_optimizer_cls(self.coefficients, lr=activation_lr)
        self._activation_batches = None
        self.add_callback(_HeldOutUpdate(self))

    def train(self, *args, **kwargs):
        self._activation_batches = cycle(self.get_eval_dataloader(self.activation_dataset))
        with coefficients_trainable(self.coefficients, False):
            return super().train(*args, **kwargs)

    def activation_update(self) -> torch.Tensor:
        """One held-out batch updates the coefficients (see the class docstring); returns its loss."""
        inputs = self._prepare_inputs(next(self._activation_batches))
        model = self.model_wrapped
        model.train()
        return activation_step(lambda: self.compute_loss(model, inputs), self.coefficients, self.activation_optimizer)


class _HeldOutUpdate(TrainerCallback):
    """Runs [`BilevelTrainer.activation_update`] after every `activation_every`-th optimizer step."""

    def __init__(self, trainer: BilevelTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.trainer.activation_every == 0:
            self.trainer.activation_update()
        return control
