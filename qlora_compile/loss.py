"""The output head and the causal-LM loss fused: the loss without the full logits.

transformers computes `logits = lm_head(hidden)` for every position, upcasts them to fp32 and takes
the cross-entropy against the labels shifted by one. On SmolLM2 at 4 x 512 tokens those logits are
4 x 512 x 49152 values: 400 MB in fp32, plus their gradient. `linear_cross_entropy` computes the
same loss over chunks of tokens: each chunk's logits (in the head's dtype, then fp32), their
log-sum-exp, the loss, and at once the gradient of the hidden states, `(softmax - onehot) W`,
scaled in backward. Only one chunk's logits exist at a time. The head must be frozen (QLoRA's is):
no gradient is computed for it.

`fuse_causal_lm_loss` applies it to a transformers causal LM whose forward is "decoder, then
`lm_head`, then the loss" (the families in `FUSED_LOSS_MODELS`): in training mode, with `labels`
and gradients on, the forward runs with the head bypassed, so its `logits` are the hidden states,
and returns the fused loss with `logits=None`. Every other call (`generate()`, eval, no labels) is
the model's own.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

IGNORE_INDEX = -100  # transformers' label of positions without loss
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M (32 MiB in fp32)

# model_type -> the forward is decoder, `lm_head` on the hidden states, `loss_function`: nothing
# between them (no logit soft-capping or scaling), and no auxiliary loss
FUSED_LOSS_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, chunk):
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = nn.functional.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if needs_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                probs.mul_(valid[:, None])
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden, divisor)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, divisor = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        scale = (grad_loss / divisor).to(grad_hidden.dtype)
        return grad_hidden * scale, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss of `linear(hidden, weight, bias)` against `labels`, without the
    full logits.

    hidden: (batch, seq, hidden_size); labels: (batch, seq), IGNORE_INDEX where there is no loss;
    position t is scored against label t + 1 (the shift transformers' `ForCausalLMLoss` makes).
    The mean over the scored tokens, or their sum over `num_items_in_batch` when given (what
    `Trainer` passes for gradient accumulation). `chunk_tokens`: tokens per chunk (default: about
    8M logits per chunk).
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the head: it must be frozen")
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (shifted != IGNORE_INDEX).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(flat, weight, bias, shifted.to(hidden.device), divisor, chunk)


def fusable_head(model: nn.Module) -> nn.Module | None:
    """The frozen output head of a model `fuse_causal_lm_loss` applies to, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_LOSS_MODELS:
        return None
    if not type(model).__name__.endswith("ForCausalLM"):
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return None
    return head


def fuse_causal_lm_loss(model: nn.Module) -> bool:
    """Make `model`'s training forwards with labels use `linear_cross_entropy`, in place (an
    instance `forward`). False, and nothing changed, where the model is not one it applies to."""
    head = fusable_head(model)
    if head is None:
        return False
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None or "shift_labels" in kwargs or not model.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        head.forward = _hidden_states  # the forward's "logits" are then the hidden states
        try:
            out = original(*args, **kwargs)
        finally:
            del head.forward
        loss = linear_cross_entropy(
            out.logits, head.weight, labels, bias=head.bias, num_items_in_batch=num_items
        )
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})

    model.forward = forward
    return True


def _hidden_states(x: torch.Tensor) -> torch.Tensor:
    return x
