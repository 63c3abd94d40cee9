"""Closed-loop evaluation as a training hook (`train.eval_every`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence


def closed_loop_eval_fn(schema: str, processor_source: Callable[[], Any], episodes: int,
                        replan_every: int | None = None, tasks: Sequence[str] = ()) -> Callable:
    """`eval_fn(model, step) -> metrics` for the built-in task suites.

    `processor_source()` returns the run's processor (built by the trainer once the data is ready).
    """
    if schema not in ("toy_reach", "metaworld_sawyer"):
        raise ValueError(f"no built-in closed-loop evaluation for schema {schema!r} "
                         "(available: toy_reach, metaworld_sawyer); set train.eval_every=0")
    if schema == "metaworld_sawyer" and not tasks:
        raise ValueError("closed-loop MetaWorld evaluation during training needs --eval-tasks")

    def eval_fn(model, step: int) -> dict[str, float]:
        from ..policy import Policy

        policy = Policy(model, processor_source())
        if schema == "toy_reach":
            from .toy import evaluate

            r = evaluate(policy, episodes, replan_every=replan_every)
        else:
            from .metaworld import evaluate

            r = evaluate(policy, list(tasks), episodes, replan_every=replan_every)
        out = {"success_rate": float(r["success_rate"])}
        for task, t in r["per_task"].items():
            out[f"success/{task}"] = float(t["success_rate"])
        return out

    return eval_fn
