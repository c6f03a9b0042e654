"""The hook owner: records attention probabilities, tokens and attention gradients of a ViT.

One object owns every hook it registers and removes them in :meth:`ViTCapture.release` (also on
leaving a ``with`` block), in the manner of pytorch-grad-cam's activation/gradient recorders.
:class:`Capture` is what every explainer's capture object offers (ViTs and CNNs alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch
import torch.nn as nn

__all__ = ["Capture", "ViTCapture", "unwrap_vit"]

_CaptureT = TypeVar("_CaptureT", bound="ViTCapture")  # a subclass entered as a context is that subclass
_SelfT = TypeVar("_SelfT")


class Capture(Protocol):
    """A context manager owning the hooks that record one forward pass for an explainer."""

    def release(self) -> None:
        """Remove every hook; safe to call twice."""

    def __enter__(self: _SelfT) -> _SelfT: ...

    def __exit__(self, *exc: object) -> None: ...


def unwrap_vit(model: nn.Module) -> nn.Module:
    """The ViT inside DDP/DataParallel wrappers (anything with a ``.module``); needs ``.blocks``."""
    while not hasattr(model, "blocks") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "blocks"):
        raise TypeError(f"{type(model).__name__} has no transformer `blocks` to capture")
    return model


class ViTCapture:
    """Record, per selected block, the post-softmax attention (B, h, S, S) and output tokens (B, S, D).

    Args:
        model: an :class:`~custom_components.networks.AttributionViT` (possibly DDP-wrapped).
        blocks: block indices to record (negative counts from the end); ``None`` records all.
        attention: record attention probabilities (switches those blocks to explicit softmax).
        tokens: record each block's output tokens (before any final norm).
        detach: store detached tensors (explanation at inference); keep them in the autograd
            graph (default) when a loss is computed from them.
        attention_grads: also record d(output)/d(attention) on backward, for gradient-weighted
            explainers that call ``backward``.

    Records of a forward pass are in ``attentions``, ``tokens`` and ``attention_grads``
    (dicts keyed by the non-negative block index); :meth:`clear` empties them.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[int] | None = (-1,),
        attention: bool = True,
        tokens: bool = True,
        detach: bool = False,
        attention_grads: bool = False,
    ) -> None:
        self.vit = unwrap_vit(model)
        n = len(self.vit.blocks)
        indices = range(n) if blocks is None else blocks
        self.block_indices = sorted({i % n for i in indices})
        self.detach = detach
        self.record_grads = attention_grads
        self.attentions: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self.attention_grads: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._switched: list[nn.Module] = []
        for i in self.block_indices:
            block = self.vit.blocks[i]
            if attention:
                block.attn.record_attention = True
                self._switched.append(block.attn)
                self._handles.append(block.attn.attn_probs.register_forward_hook(self._attention_hook(i)))
            if tokens:
                self._handles.append(block.register_forward_hook(self._token_hook(i)))

    def _attention_hook(self, index: int):
        def hook(module, inputs, output):
            if self.record_grads and output.requires_grad:
                output.register_hook(lambda grad: self.attention_grads.__setitem__(index, grad.detach()))
            self.attentions[index] = output.detach() if self.detach else output

        return hook

    def _token_hook(self, index: int):
        def hook(module, inputs, output):
            self.tokens[index] = output.detach() if self.detach else output

        return hook

    def attention(self, block: int = -1) -> torch.Tensor:
        return self._get(self.attentions, block, "attention")

    def token(self, block: int = -1) -> torch.Tensor:
        return self._get(self.tokens, block, "tokens")

    def attention_grad(self, block: int = -1) -> torch.Tensor:
        return self._get(self.attention_grads, block, "attention gradient")

    def _get(self, store: dict, block: int, what: str) -> torch.Tensor:
        index = block % len(self.vit.blocks)
        if index not in store:
            raise RuntimeError(f"no {what} recorded for block {index}: run a forward (and backward) inside the capture")
        return store[index]

    def clear(self) -> None:
        self.attentions.clear()
        self.tokens.clear()
        self.attention_grads.clear()

    def release(self) -> None:
        """Remove every hook and restore the fused attention path; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn in self._switched:
            # another live capture may still hook this block: keep its explicit-softmax path on
            if not attn.attn_probs._forward_hooks:
                attn.record_attention = False
        self._switched.clear()
        self.clear()

    def __enter__(self: _CaptureT) -> _CaptureT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if "_handles" in self.__dict__:  # __init__ may have failed before registering anything
            self.release()
