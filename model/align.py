"""Beyond imitation: preference tuning (DPO) and reinforcement learning from verifiable rewards
(GRPO), their losses as the papers and TRL write them, and the rollouts GRPO learns from, sampled
through the one engine. model/reference.py holds the same losses in NumPy, and the tests hold the
two together number by number.

Both compare the policy (the model that trains) with a reference, the model they started from,
frozen: a copy of it, or under LoRA the same model with its adapters switched off (no second copy,
as TRL does with peft). Log-probabilities are of the answer's tokens only (targets -1 elsewhere, as
in supervised fine-tuning), in float32 whatever the autocast dtype.
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from model.engine import Engine, Request, without_stop
from model.lora import LoRALinear
from model.runtime import derived_seed
from model.tasks.chat import padded_batch


def token_logps(logits, targets):
    """logits (B, T, V), targets (B, T) with -1 outside the answer -> (B, T) float32 (float64 for a
    float64 model): log p(target) at each answer token, 0 elsewhere."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -1, picked, 0.0)


# ---- the reference ------------------------------------------------------------------------

@contextmanager
def adapters_off(model):
    """The model as its base computes it: every LoRA adapter's output scaled by 0 (W x + b exactly)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


class Reference:
    """The frozen starting model: a model of its own (`frozen`), or (None) the policy with its
    LoRA adapters off."""

    def __init__(self, policy, frozen=None):
        self.policy, self.copy = policy, frozen.eval().requires_grad_(False) if frozen is not None else None

    @classmethod
    def copy_of(cls, policy):
        return cls(policy, copy.deepcopy(policy))

    @torch.no_grad()
    def token_logps(self, x, y):
        if self.copy is not None:
            return token_logps(self.copy(x)[0], y)
        with adapters_off(self.policy):
            return token_logps(self.policy(x)[0], y)


# ---- DPO ----------------------------------------------------------------------------------

def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Log-probabilities (B,) of the chosen and rejected answers under the policy and the reference
    -> (loss, metrics with TRL's names). With h = (chosen - ref_chosen) - (rejected - ref_rejected):
    sigmoid (DPO): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), e the label smoothing;
    ipo: (h - 1 / (2 beta))^2 (IPO reads mean log-probabilities per token: the caller's)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
    return losses.mean(), metrics


@dataclass
class DPO:
    """The loss of a batch of pairs: x, y (2B, T), the chosen answers in rows [0, B), the rejected
    ones of the same prompts in rows [B, 2B) (PreferenceTask.get_batch)."""
    reference: Reference
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def sequence_logps(self, per_token, y):
        """(2B, T) -> (2B,): sums over the answer's tokens (IPO: their mean)."""
        total = per_token.sum(-1)
        return total / (y != -1).sum(-1) if self.loss_type == "ipo" else total

    def __call__(self, model, x, y):
        logps = self.sequence_logps(token_logps(model(x)[0], y), y)
        ref = self.sequence_logps(self.reference.token_logps(x, y), y)
        B = len(x) // 2
        return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], self.beta, self.loss_type, self.label_smoothing)


# ---- GRPO ---------------------------------------------------------------------------------

def group_advantages(rewards, group_size, eps=1e-4):
    """rewards (N * G,), G consecutive samples of each prompt -> (r - the group's mean) / (the
    group's std + eps), as TRL (std unbiased, eps 1e-4): a group whose rewards are all equal gives 0."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.0):
    """Per-token log-probabilities (B, T) of the policy, of the policy that sampled (old) and of
    the reference (None when beta is 0), advantages (B,), mask (B, T) of completion tokens -> (loss,
    metrics). Per token: -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon) A) + beta KL, with
    ratio = exp(logps - old) and KL the k3 estimator exp(ref - logps) - (ref - logps) - 1; averaged
    over all the completion tokens of the batch."""
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + epsilon) * A)
    n = mask.sum().clamp(min=1)
    metrics = {"clip_ratio": ((((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))) & mask).sum() / n}
    if beta:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum().detach() / n
    return (per_token * mask).sum() / n, metrics


@dataclass
class Rollouts:
    """One batch of sampled completions, as training reads them: x, y (N, T) (y the completion's
    tokens, -1 on the prompt and the padding), their advantages (N,) and the sampling policy's
    per-token log-probabilities (N, T) (None: it is the policy itself, one step per batch)."""
    x: torch.Tensor
    y: torch.Tensor
    advantages: torch.Tensor
    old_logps: object
    ref_logps: object
    metrics: dict


def sample_groups(model, prompts, rules, group_size, seed):
    """Each prompt's ids G times through the engine, sample i of prompt p drawing from its own
    seed (seed, p, i): the same rollouts for the same seed, in any run. -> the finished Requests."""
    requests = [Request(list(p), replace(rules, seed=derived_seed(seed, j, i)))
                for j, p in enumerate(prompts) for i in range(group_size)]
    return Engine(model, max_batch=len(requests)).complete(requests)  # in eval mode, the model's own after


def pack(requests, pad_id):
    """Finished requests -> x, y (N, T) as a batch of answers: prompt + completion, the loss on the
    completion (its stop id included, so the model learns to stop), padded as ChatTask pads."""
    return padded_batch([(np.array(r.prompt + r.tokens), np.arange(len(r.prompt) + len(r.tokens)) >= len(r.prompt))
                         for r in requests], pad_id)


@dataclass
class GRPO:
    """Reinforcement learning from verifiable rewards, as DeepSeekMath's GRPO and TRL's trainer:
    a group of num_generations samples per prompt, each scored by the rewards, each sample's
    advantage its reward against its group's; then num_iterations optimizer steps on the clipped
    objective (the first of them has ratio 1), with an optional KL to the reference."""
    rewards: object  # model.rewards.Rewards
    reference: object  # Reference, or None when beta is 0
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    epsilon: float = 0.2
    beta: float = 0.0
    num_iterations: int = 1

    def rollouts(self, model, task, rows, seed):
        """Sample, score and pack a batch of task rows (each {"ids", "prompt", columns})."""
        # as long as asked, and as the model has room for: the last token written is never read back
        room = task.block_size + 1 - max(len(r["ids"]) for r in rows)
        rules = replace(task.rules, max_tokens=min(self.max_completion_length, room), temperature=self.temperature,
                        top_k=None, top_p=1.0)
        requests = sample_groups(model, [r["ids"] for r in rows], rules, self.num_generations, seed)
        group = [row for row in rows for _ in range(self.num_generations)]
        texts = [task.tokenizer.decode(without_stop(r.tokens, r.rules)) for r in requests]
        rewards = torch.tensor(self.rewards(group, texts), dtype=torch.float32)
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in pack(requests, task.rules.stop_ids[0] if task.rules.stop_ids else 0))
        with torch.no_grad():
            old = token_logps(model(x)[0], y) if self.num_iterations > 1 else None
            ref = self.reference.token_logps(x, y) if self.beta else None
        metrics = {"reward": rewards.mean(), "reward_std": rewards.std(),
                   "completion_length": torch.tensor([len(r.tokens) for r in requests], dtype=torch.float32).mean()}
        return Rollouts(x, y, group_advantages(rewards, self.num_generations).to(x.device), old, ref, metrics)

    def loss_fn(self, rollouts):
        """The loss of one batch of rollouts, for train_step(loss_fn=...)."""
        def loss(model, x, y):
            logps = token_logps(model(x)[0], y)
            old = rollouts.old_logps if rollouts.old_logps is not None else logps.detach()
            value, metrics = grpo_loss(logps, old, rollouts.ref_logps, rollouts.advantages, y != -1, self.epsilon,
                                       self.beta)
            return value, {**rollouts.metrics, **metrics}
        return loss
