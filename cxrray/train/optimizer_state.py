"""Optimizer state that survives a change of worker count: Adam's moments gathered whole, per parameter
name, and spread again over whatever layout loads them (issue 28 §2).

Per-rank files (`optimizer-rank{r}`) restore a run exactly when the layout is unchanged. Under ZeRO each
holds only that rank's slice of flat, padded partitions, which mean nothing at another world size, so the
checkpoint also carries `optimizer-full`: {objective: {"step": int, "params": {name: {"exp_avg": tensor,
"exp_avg_sq": tensor}}}} with every tensor in its parameter's own shape (fp32). DeepSpeed's own answer
(`ds_to_universal`) reads and writes torch.save files, which this project never unpickles, so the
gather and the re-partition use DeepSpeed's public fragment API (`safe_get/set_full_optimizer_state`).

Both functions are collective: every rank calls them, in the same order. Only Adam-family state
(step, exp_avg, exp_avg_sq) is carried: it is the only optimizer the engine builds.
"""
from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def full_state(engine, keep: bool = True) -> dict:
    """Every objective's optimizer state by parameter name, whole (collective: every rank calls it; ranks
    that pass keep=False take part in ZeRO's gathers without holding a host copy, and get {}).

    Cost at each checkpoint: one all-reduce per parameter and moment under ZeRO, and on the keeping rank a host
    copy of both moments (8 bytes per parameter: ~8 GB at 1B parameters). Per-rank fragments saved by name
    would need no collective; not built."""
    names = {id(p): n for n, p in engine.model.named_parameters()}
    out = {}
    for o in engine.objectives:
        if _partitioned(o):
            from deepspeed.utils import safe_get_full_optimizer_state

            zero = o.wrapped.optimizer
            steps = [s["step"] for s in zero.optimizer.state.values() if "step" in s]
            if not steps:  # no step taken yet: nothing to carry
                continue
            params = {}
            for p in o.params:
                whole = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}  # every rank: all-reduces
                if keep:
                    params[names[id(p)]] = {k: v.detach().float().cpu() for k, v in whole.items()}
        elif not keep:
            continue
        else:
            steps = [o.optimizer.state[p]["step"] for p in o.params if "step" in o.optimizer.state.get(p, {})]
            if not steps:
                continue
            params = {names[id(p)]: {k: o.optimizer.state[p][k].detach().float().cpu() for k in MOMENTS}
                      for p in o.params if p in o.optimizer.state}
        if keep:
            out[o.name] = {"step": int(max(float(s) for s in steps)), "params": params}
    return out


def load_full_state(engine, state: dict) -> list[str]:
    """Set every objective's optimizer state from `full_state`'s output, partitioned for this engine's
    layout (collective). Returns the objectives restored; a parameter missing from `state` is an error."""
    names = {id(p): n for n, p in engine.model.named_parameters()}
    restored = []
    for o in engine.objectives:
        saved = state.get(o.name)
        if saved is None:
            continue
        missing = [names[id(p)] for p in o.params if names[id(p)] not in saved["params"]]
        if missing:
            raise ValueError(f"optimizer state for objective {o.name!r} lacks parameters {missing[:5]}")
        step = torch.tensor(float(saved["step"]))
        if _partitioned(o):
            from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

            zero = o.wrapped.optimizer
            # Adam creates its state at its first step: create it (zeros, this rank's flat partitions) so
            # that each parameter's fragment can be linked to it, then fill the fragments by name
            for flat in zero.single_partition_of_fp32_groups:
                zero.optimizer.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
            for i, group in enumerate(zero.bit16_groups):
                lazy_init_hp_params_optimizer_state(group, zero.single_partition_of_fp32_groups[i], zero.optimizer.state)
            zero._hp_optimizer_states_linked = True
            for p in o.params:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, saved["params"][names[id(p)]][k].to(p.device), k)
        else:
            for p in o.params:
                o.optimizer.state[p] = {"step": step.clone(), **{k: saved["params"][names[id(p)]][k].to(p.device).clone()
                                                                 for k in MOMENTS}}
        restored.append(o.name)
    return restored


def _partitioned(o) -> bool:
    """A DeepSpeed ZeRO (1/2) optimizer, whose state lives in flat per-rank partitions; otherwise a torch
    optimizer (DDP, a further objective, ZeRO 0) keyed by the parameters themselves, whole on every rank."""
    return o.engine == "deepspeed" and hasattr(getattr(o.wrapped, "optimizer", None), "single_partition_of_fp32_groups")
