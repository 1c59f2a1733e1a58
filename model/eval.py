"""Scoring a model on a task's known answers: greedy exact match, through the engine. Run as
`python -m model.eval`, it evaluates a model with lm-evaluation-harness (model/harness.py)."""

from dataclasses import replace

from model.engine import Engine, Request


def exact_match(model, pairs, rules, max_batch=256):
    """The share of (prompt ids, answer ids) pairs whose whole answer (its stop id included, when it
    has one) the model writes exactly, greedily, under the model's `rules`."""
    requests = [Request(list(prompt), replace(rules, max_tokens=len(answer), temperature=0.0)) for prompt, answer in pairs]
    # shortest prompts first: requests that join together read their prompts in one forward pass
    Engine(model, max_batch).complete(sorted(requests, key=lambda r: (len(r.prompt), r.rules.max_tokens)))
    return sum(r.tokens == list(answer) for r, (_, answer) in zip(requests, pairs)) / max(1, len(pairs))


def answer_scores(model, task):
    """{"heldout_acc": ..., "train_acc": ...} for a task whose answers are the one right ones ({}
    for the others); heldout_acc only when examples are held out."""
    if not task.exact_match:
        return {}
    scores = {}
    for split, name in (("val", "heldout_acc"), ("train", "train_acc")):
        pairs = task.answers(split)
        if pairs:
            scores[name] = exact_match(model, pairs, task.rules)
    return scores


if __name__ == "__main__":
    import sys

    from model.harness import main  # lm-eval, an optional extra: read only when evaluating with it
    sys.exit(main(sys.argv[1:]))
