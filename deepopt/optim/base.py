"""The ``torch.optim.Optimizer`` shell over chains of levels.

A deepopt optimizer is a list of chains (the first chain that applies to a parameter takes it:
Muon's chain takes matrices, the element-wise fallback the rest) plus this shell, which owns what
torch users expect: ``param_groups`` with validated hyperparameters, ``step(closure)``, weight
decay, slow parameter groups, the non-finite-gradient policy and checked checkpoints.

The step applied to each parameter, for the chain's direction ``d = (mul/div) num/den``:

    W <- W (1 - lr wd)                     (decoupled weight decay; coupled: g <- g + wd W)
    W <- W - (lr mul / div) num / den      (``addcdiv_``, or ``add_`` when there is no den)

Slow parameter groups: a group with ``period=C`` accumulates its gradients over C steps and is
updated at every C-th step with their mean; its optimizer state (and step count) advances only
then (the Continuum Memory System rule, Behrouz et al. 2025, Eq. 71).

Non-finite gradients (``nonfinite=``): ``"skip"`` (default) computes, before anything changes, a
flag on the device, "some gradient holds NaN or Inf" (:func:`~deepopt.optim.conventions.nonfinite_flag`:
one multi-tensor pass per dtype group, on CUDA a Triton launch; no host sync), and a step with the flag set leaves every
parameter and every state untouched, warns, and counts in ``optimizer.skipped_steps``. Where the
fused kernels run (CUDA), they read the flag and store nothing when it is set, as torch's fused
Adam does with ``found_inf``; the shell reads the flag lazily (at the next step, or when
``skipped_steps`` or ``state_dict()`` is read) and then takes the step counters back. Elsewhere
(CPU, where reading it is no sync; foreach paths, slow groups, DTensors) the flag is read before
the step, which is then skipped whole. ``"raise"`` raises ``FloatingPointError``; ``"ignore"``
does no check and lets NaN propagate, as torch's optimizers do.

torch conventions (:mod:`deepopt.optim.conventions`): ``maximize``/``foreach``/``fused``/
``capturable``/``differentiable`` group keys, hyperparameters validated before parameters,
``copy.deepcopy``/``pickle`` keep every attribute, checkpoints from older torch (numeric ``step``)
or older deepopt (missing convention keys) load, and ``state_dtype`` is honoured on every path.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor

from ..chain import Chain
from ..distributed import distributed_ns, is_dtensor, needs_full_tensors, on_full_tensors
from ..kernels.launch import apply_directions
from ..levels import fused as fused_steps
from ..levels.base import Direction, State, axpy
from .conventions import (_PLAIN, CONVENTIONS, check_conventions, check_real, device_flag, flag_set, flag_to_host,
                          host_ints, outside_graphs, run_eagerly, state_dtype_for, tensor_step)

__all__ = ["LevelOptimizer", "Rule", "IMPLS", "NONFINITE_POLICIES", "apply_direction", "chain_for", "coupled_decay",
           "group_defaults"]

IMPLS = ("auto", "foreach", "reference", "triton")
NONFINITE_POLICIES = ("skip", "raise", "ignore")
_SLOW_SUM, _SLOW_CALLS = "slow.grad_sum", "slow.calls"
_GRAD, _SPARSE, _DTYPE = operator.attrgetter("grad"), operator.attrgetter("is_sparse"), operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_UNSET = object()  # _run_chain's "no fused step given": look it up
#: constructor arguments that configure the shell, not the update rule
_SHELL_ARGS = ("self", "params", "impl", "nonfinite", "model")


class Rule(NamedTuple):
    """An optimizer's update rule without parameters: what both the class and
    :mod:`deepopt.functional` are built from."""

    chains: list[Chain]
    defaults: dict[str, Any]
    weight_decay_mode: str


def group_defaults(chains: Iterable[Chain], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every level's hyperparameter defaults, overridden by the optimizer's ``defaults``."""
    merged: dict[str, Any] = {}
    for chain in chains:
        merged.update(chain.defaults)
    merged.update(defaults)
    return merged


def chain_for(chains: Iterable[Chain], p: Tensor, group: Mapping[str, Any]) -> Chain | None:
    """The first chain that applies to ``p`` (Muon's chain takes matrices, its fallback the rest)."""
    for chain in chains:
        if chain.applies_to(p, group):
            return chain
    return None


def coupled_decay(g: Tensor, p: Tensor, weight_decay: Any) -> Tensor:
    """SGD's coupled weight decay ``g + wd W`` (the gradient itself when ``wd`` is the number 0)."""
    if not isinstance(weight_decay, Tensor) and weight_decay == 0:
        return g
    return axpy(g, p, weight_decay)


def apply_direction(p: Tensor, d: Direction, lr: Any, decay: Any = 0.0) -> Tensor:
    """The parameter after one step (pure): ``W (1 - lr decay) - (lr mul / div) num / den``.

    The same floating-point operations as the shell's in-place foreach step (``mul_``, then
    ``addcdiv_``/``add_`` with ``alpha``); tensor ``lr``/``decay``/``mul`` (being differentiated)
    use plain arithmetic. ``decay`` is the decoupled weight decay (0 for coupled optimizers).
    """
    out = p if (not isinstance(decay, Tensor) and decay == 0) else p * (1 - lr * decay)
    alpha = -(lr * d.mul) / d.div
    if isinstance(alpha, Tensor):
        return out + alpha * (d.num if d.den is None else d.num / d.den)
    if d.den is None:
        return torch.add(out, d.num, alpha=alpha)
    return torch.addcdiv(out, d.num, d.den, value=alpha)


class LevelOptimizer(torch.optim.Optimizer):
    """Base class of every deepopt optimizer. Subclasses pass their chains and defaults.

    Args:
        params: parameters or param groups, as for any torch optimizer. A group may set
            ``period`` (slow group, default 1).
        defaults: hyperparameter defaults (must hold ``lr`` and ``weight_decay``).
        chains: the update rules; each parameter goes to the first chain that applies to it.
        weight_decay_mode: ``"decoupled"`` (AdamW, Muon) or ``"coupled"`` (SGD).
        impl: ``"auto"`` (default: a fused Triton kernel where ``deepopt.levels.fused`` has one for the
            chain and the parameters are on CUDA, else ``"foreach"``), ``"foreach"`` (in-place
            multi-tensor path), ``"reference"`` (the pure functional core, tensor by tensor) or
            ``"triton"`` (require the kernel).
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see the module docstring).
    """

    weight_decay_mode = "decoupled"

    @classmethod
    def rule(cls, **hyperparameters: Any) -> Rule:
        """The update rule for these hyperparameters (the constructor's defaults fill the rest),
        without parameters: the chains and group defaults the constructor would build. This is
        what :func:`deepopt.functional.make` turns into a pure ``init``/``update`` pair.

        Example:
            >>> import deepopt
            >>> rule = deepopt.AdamMemory.rule(lr=1e-2)
            >>> rule.defaults["lr"], rule.weight_decay_mode
            (0.01, 'decoupled')
        """
        sig = inspect.signature(cls.__init__)
        names = [n for n in sig.parameters if n not in _SHELL_ARGS and n not in CONVENTIONS]
        conventions = {k: hyperparameters.pop(k) for k in list(hyperparameters) if k in CONVENTIONS}
        unknown = sorted(set(hyperparameters) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} has no hyperparameter {unknown}; it takes {names}")
        check_conventions(conventions)
        kwargs = {n: sig.parameters[n].default for n in names if sig.parameters[n].default is not inspect._empty}
        kwargs.update(hyperparameters)
        missing = sorted(set(names) - set(kwargs))
        if missing:
            raise TypeError(f"{cls.__name__}.rule needs {missing}")
        rule = cls._rule(**kwargs)
        rule.defaults.update({**CONVENTIONS, **conventions})  # the class's group keys (maximize is math)
        return rule

    @classmethod
    def _rule(cls, **hyperparameters: Any) -> Rule:
        raise TypeError(f"{cls.__name__} builds its chains from its parameters; it has no parameter-free rule")

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], chains: list[Chain], *,
                 impl: str = "auto", nonfinite: str = "skip", **conventions: Any) -> None:
        unknown = sorted(set(conventions) - set(CONVENTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        if impl not in IMPLS:
            raise ValueError(f"invalid impl: {impl!r}; use one of {IMPLS}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"invalid nonfinite: {nonfinite!r}; use one of {NONFINITE_POLICIES}")
        self.chains = list(chains)
        self.impl = impl
        self.nonfinite = nonfinite
        self._skipped_steps = 0
        self._pending: tuple[Any, list[Tensor]] | None = None  # a flag the kernels read, not yet the host
        self._plans: dict[int, tuple] = {}  # per group: (key, parts, group, params list): see _plan
        defaults = {"period": 1, **group_defaults(self.chains, defaults), **CONVENTIONS, **conventions}
        self._check_hyperparameters(defaults)  # as torch: hyperparameters first, then the parameters
        super().__init__(params, defaults)
        outside_graphs()

    # ------------------------------------------------------------------ copy, pickle
    def __getstate__(self) -> dict[str, Any]:
        """Every attribute (chains, impl, nonfinite, ...) but the hooks, which torch drops too."""
        self._settle()
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items()
                      if k not in state and not k.startswith("_optimizer_") and k not in _UNPICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what ``load_state_dict`` calls: fill convention keys older checkpoints lack and
        turn numeric ``step`` counters (older torch) into float32 tensors, as torch does."""
        super().__setstate__(state)
        if "skipped_steps" in self.__dict__:  # pickled by a version that kept a plain attribute
            self._skipped_steps = self.__dict__.pop("skipped_steps")
        self.__dict__.setdefault("_skipped_steps", 0)
        self.__dict__.setdefault("_pending", None)
        self._plans = {}  # (load_state_dict comes here too) every cached plan is rebuilt
        for group in self.param_groups:
            self._upgrade_group(group)
        for s in self.state.values():
            for k in ("step", _SLOW_CALLS):
                if k in s:
                    s[k] = tensor_step(s[k])

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        """Fill the keys a checkpoint of an older version may lack (see :meth:`_optional_keys`)."""
        for k, v in CONVENTIONS.items():
            group.setdefault(k, v)

    def _optional_keys(self) -> set[str]:
        """Group keys a checkpoint may lack (filled by :meth:`_upgrade_group`)."""
        return set(CONVENTIONS)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.__dict__.setdefault("_plans", {}).clear()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters (types as torch: ``TypeError``; values: ``ValueError``)."""
        check_real("lr", group["lr"], "the learning rate")
        check_real("weight_decay", group["weight_decay"], "weight_decay")
        period = group["period"]
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"invalid period: {period!r}; a group's update period must be an int >= 1")
        check_conventions(group)
        distributed_ns(group)  # the optional key: "spread" (default) or "replicate"
        if group["foreach"] is not None and self.impl != "auto":
            raise ValueError(f"foreach={group['foreach']!r} and impl={self.impl!r} both choose the implementation; "
                             "give one of them")
        self._prepare_group(group)
        for chain in self.chains:
            chain.validate(group)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Derive group keys from others before validation and each step (M3: its ``betas``)."""

    def _validate(self, group: dict[str, Any]) -> None:
        self._check_hyperparameters(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters; "
                                 "optimize torch.view_as_real(p) instead")
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} can only optimize floating-point parameters, got {p.dtype}")
            if _is_fsdp1_flat(p) and not all(getattr(lvl, "elementwise", False) for c in self.chains for lvl in c.levels):
                raise ValueError(f"{type(self).__name__} got a parameter flattened by FSDP1 (FullyShardedDataParallel, "
                                 "Lightning strategy='fsdp'): its matrix levels would only see a flat vector. Use FSDP2 "
                                 "(torch.distributed.fsdp.fully_shard, Lightning ModelParallelStrategy) instead")
            if self._chain_for(p, group) is None:
                raise ValueError(f"no level of {type(self).__name__} applies to a parameter of shape "
                                 f"{tuple(p.shape)}; put it in a group the optimizer supports")
            state_dtype_for(p, group)  # a state_dtype narrower than the parameter raises here

    def _chain_for(self, p: Tensor, group: Mapping[str, Any]) -> Chain | None:
        return chain_for(self.chains, p, group)

    # ------------------------------------------------------------------ the step
    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (reads a pending device flag first)."""
        self._settle()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps = value

    def state_dict(self) -> dict[str, Any]:
        self._settle()  # the step counters of a skipped step are taken back first
        return super().state_dict()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle()
        grads_by_group = [self._collect(group) for group in self.param_groups]
        found, make = None, False
        if self.nonfinite == "skip" and self._kernels_make_flag(grads_by_group):
            # the step's one fused call checks the gradients in its first pass (FusedStep.makes_flag)
            device = next(gs[0].device for _, gs in grads_by_group if gs)
            found, make = torch.zeros(1, dtype=torch.float32, device=device), True
        elif self.nonfinite != "ignore":
            found = device_flag([g for ps, gs in grads_by_group for g in gs])
            if found is not None and (self.nonfinite == "raise" or not self._kernels_take_flag(grads_by_group)):
                if flag_set(found):  # on the CPU a read of host memory; on CUDA a sync (foreach paths only)
                    if self.nonfinite == "raise":
                        raise FloatingPointError(f"{type(self).__name__}: a gradient holds NaN or Inf; no parameter "
                                                 "was changed (use nonfinite='skip' to skip such steps)")
                    self._count_skip()
                    return loss
                found = None
        advanced: list[Tensor] = []
        # on CUDA an asynchronous copy to the host, queued before the step's kernels (after them where they make the flag)
        reader = None if found is None or make else FlagReader(found)
        for group, (params, grads) in zip(self.param_groups, grads_by_group):
            if group["maximize"] and grads:  # ascend: the gradient of -f (new tensors, grads untouched)
                grads = torch._foreach_neg(grads)
            if group["period"] > 1:
                params, grads = self._slow(group, params, grads)
            if params:
                self._step_group(group, params, grads, found, advanced, make)
        if make:
            reader = FlagReader(found)
        if reader is not None:
            run_eagerly(self._set_pending, (reader, advanced))
            if not found.is_cuda:  # reading it costs nothing here: count and warn at once
                self._settle()
        return loss

    def _set_pending(self, pending: tuple[Any, list[Tensor]]) -> None:
        self._pending = pending

    def _count_skip(self) -> None:
        if torch.compiler.is_compiling():  # the attribute and the warning outside the graph (run_eagerly)
            return run_eagerly(self._count_skip)
        self._skipped_steps += 1
        warnings.warn(f"{type(self).__name__}: skipped a step because a gradient holds NaN or Inf "
                      f"(parameters and state unchanged; {self._skipped_steps} skipped so far)",
                      RuntimeWarning, stacklevel=3)

    def _settle(self) -> None:
        """Read the flag the kernels of the last step took: if it was set, they stored nothing, and
        the step counters they advanced go back."""
        if self._pending is None:
            return
        if torch.compiler.is_compiling():
            return run_eagerly(self._settle)
        pending, self._pending = self._pending, None
        if pending[0].read():
            if pending[1]:
                torch._foreach_sub_(pending[1], 1.0)
            self._count_skip()

    def _kernels_make_flag(self, grads_by_group) -> bool:
        """Whether this step is one fused call whose kernels compute the non-finite flag in their
        first pass (:meth:`deepopt.kernels.launch.FusedStep.makes_flag`): one param group with
        gradients, period 1, one chain for all its parameters, plain tensors on one device. The
        call itself confirms that the pass covers every gradient (one dtype combination), else it
        checks them first (``_run_chain``)."""
        live = [(group, params, grads) for group, (params, grads) in zip(self.param_groups, grads_by_group) if params]
        if len(live) != 1:
            return False
        group, params, grads = live[0]
        if group["period"] > 1:
            return False
        plan = self._plan(group, params)
        # plain tensors only: a DTensor's flag must be reduced over its shards
        return (len(plan) == 1 and plan[0].whole and not plan[0].full and plan[0].fused is not None
                and plan[0].fused.makes_flag(group) and plan[0].fused.use_kernel(params)
                and set(map(type, grads)) <= _PLAIN and len(set(map(_DEVICE, grads))) == 1)

    def _kernels_take_flag(self, grads_by_group) -> bool:
        """Whether every parameter of this step goes through a fused kernel that reads the device
        flag (then the step needs no host read of it)."""
        for group, (params, _) in zip(self.param_groups, grads_by_group):
            if not params:
                continue
            if group["period"] > 1:
                return False
            for part in self._plan(group, params):
                if part.fused is None or not part.fused.use_kernel(params):
                    return False
        return True

    def _plan(self, group: Mapping[str, Any], params: list[Tensor]) -> list[_Part]:
        """How this group's parameters with gradients are stepped: per chain, their positions in
        ``params``, the fused step (or None) and whether they need full tensors (DTensors).

        Cached per group between steps; the key is everything these depend on: the parameters'
        identities and dtypes, the device kind and the group's non-float values (a change of
        ``orthogonalize``, ``foreach``, ``amsgrad``, ... rebuilds it; ``lr`` and the other float
        hyperparameters do not enter it). ``add_param_group`` and ``load_state_dict`` drop every
        plan. Example: the parts of a group whose matrices Muon takes and whose vectors its
        element-wise fallback takes are two."""
        hit = self._plans.get(id(group))
        if hit is not None and hit[3] is params:  # asked again within this step (the same list)
            return hit[1]
        key = (tuple(map(id, params)), tuple(map(_DTYPE, group["params"])), params[0].is_cuda,
               tuple((k, v) for k, v in group.items() if type(v) in _STRUCTURAL))
        if hit is not None and hit[0] == key and hit[2] is group:
            self._plans[id(group)] = (key, hit[1], group, params)
            return hit[1]
        parts: dict[int, _Part] = {}
        for i, p in enumerate(params):
            chain = self._chain_for(p, group)
            if id(chain) not in parts:
                parts[id(chain)] = _Part(chain, [])
            parts[id(chain)].positions.append(i)
        for part in parts.values():
            ps = [params[i] for i in part.positions]
            part.fused = self._fused(part.chain, group, ps)
            part.full = needs_full_tensors(part.chain, ps, group)
            part.whole = len(part.positions) == len(params)
        plan = list(parts.values())
        self._plans[id(group)] = (key, plan, group, params)
        return plan

    def _collect(self, group: Mapping[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params = group["params"]
        grads = list(map(_GRAD, params))
        if any(g is None for g in grads):  # (not `None in grads`: that compares tensors with ==)
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        else:
            params = list(params)
        if any(map(_SPARSE, grads)):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use "
                               "torch.optim.SparseAdam or a dense nn.Embedding (sparse=False)")
        return params, grads

    def _slow(self, group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor]):
        """Accumulate a slow group's gradients; return the parameters due at this step."""
        period = group["period"]
        due_p, due_g = [], []
        for p, g in zip(params, grads):
            state = self.state[p]
            if _SLOW_SUM not in state:
                state[_SLOW_SUM] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[_SLOW_CALLS] = torch.tensor(0.0, dtype=torch.float32)
            state[_SLOW_SUM].add_(g)
            state[_SLOW_CALLS] += 1
            if host_ints([state[_SLOW_CALLS]])[0] >= period:
                due_p.append(p)
                due_g.append(state[_SLOW_SUM] / period)
                state[_SLOW_SUM].zero_()
                state[_SLOW_CALLS].zero_()
        return due_p, due_g

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    found: Tensor | None = None, advanced: list[Tensor] | None = None, make_flag: bool = False) -> None:
        self._prepare_group(group)
        lr = float(group["lr"])
        wd = float(group["weight_decay"])
        for part in self._plan(group, params):
            chain = part.chain
            if part.whole:
                ps, gs = params, grads
            else:
                ps, gs = [params[i] for i in part.positions], [grads[i] for i in part.positions]
            states = self._states(ps, chain, group)
            if part.full:  # a matrix level on DTensor shards: see deepopt.distributed
                on_full_tensors(lambda fp, fg, fs: self._run_chain(chain, group, fp, fg, fs, lr, wd), ps, gs, states)
            else:
                self._run_chain(chain, group, ps, gs, states, lr, wd, found, part.fused, make_flag)
            if found is not None and advanced is not None:
                advanced.extend(s["step"] for s in states)

    def _states(self, ps: list[Tensor], chain: Chain, group: Mapping[str, Any]) -> list[State]:
        """The states of ``ps`` (initialized where new)."""
        states = [self.state[p] for p in ps]
        for i, s in enumerate(states):
            if "step" not in s:
                states[i] = self._state(ps[i], chain, group)
        return states

    def _run_chain(self, chain: Chain, group: Mapping[str, Any], ps: list[Tensor], gs: list[Tensor],
                   states: list[State], lr: float, wd: float, found: Tensor | None = None,
                   fused: Any = _UNSET, make_flag: bool = False) -> None:
        """One chain's step on a list of parameters: the fused kernel, the reference or foreach.

        Outside the kernels, a parameter whose state dtype is wider (``state_dtype``; float32 for
        float16) is stepped as an upcast copy that is rounded back into it once."""
        coupled = self.weight_decay_mode == "coupled"
        if fused is _UNSET:
            fused = self._fused(chain, group, ps)
        if fused is not None:  # one kernel: state update, decay and parameter step together
            # coupled decay g + wd p in the kernels' registers (float32, as torch's fused SGD), not
            # as a decayed copy of every gradient first (a read of g and p and a write more)
            if make_flag and not fused.flag_covered(ps, gs, states, group):
                found.copy_(device_flag(gs))  # several launch families: the check first, as usual
                make_flag = False
            kw = dict(lr=lr, weight_decay=wd, decoupled=not coupled, grads_decayed=False, found=found,
                      make_flag=make_flag)
            if torch.compiler.is_compiling():
                # the kernels read and write through tables of addresses (RowSet), which dynamo's
                # analysis of Triton kernels cannot follow (it traces a store's pointer to a kernel
                # argument, not through a loaded address), so it cannot know what they mutate; the
                # likely cause of what an H100 showed when they were traced: compiled steps of
                # DeepMomentum, DeltaMomentum and M3 off their eager twins by more than the bf16
                # tolerance (3e-2). Under torch.compile the call runs as in eager mode, between
                # graphs (a quiet graph break, like the shell's host reads).
                run_eagerly(functools.partial(fused, **kw), ps, gs, states, group)
            else:
                fused(ps, gs, states, group, **kw)
            return
        work, gs = _in_state_dtype(ps, gs, states, group)
        if coupled:
            gs = torch._foreach_add(gs, work, alpha=wd) if wd != 0 else gs  # g + wd p, as torch's SGD
        if self.impl == "reference" or group["foreach"] is False:  # the functional core, tensor by tensor
            decay = 0.0 if coupled else wd
            for p, g, state in zip(work, gs, states):
                d, new = chain.update(state, g, p, group)
                state.update(new)
                p.copy_(apply_direction(p, d, lr, decay))
        else:
            directions = chain.update_(states, gs, work, group)
            if wd != 0 and not coupled:
                torch._foreach_mul_(work, 1 - lr * wd)
            apply_directions(work, directions, lr)
        for p, w in zip(ps, work):
            if w is not p:
                p.copy_(w)

    def _fused(self, chain: Chain, group: Mapping[str, Any], params: list[Tensor]) -> Callable | None:
        """The fused kernel step for this chain, if ``impl`` asks for one and one exists."""
        if self.impl in ("foreach", "reference") or (self.impl == "auto" and not params[0].is_cuda):
            return None
        if group["foreach"] is not None:  # foreach=True/False: torch's multi-tensor or per-tensor path
            return None
        if any(is_dtensor(p) for p in params):  # kernels take plain tensors; DTensors use foreach
            return None
        if self.impl == "triton":
            try:
                import triton  # noqa: F401
            except ImportError as err:
                raise RuntimeError(f"impl='triton' needs Triton: {err}") from err
        fused = fused_steps.fused_step_for(chain, group)
        if fused is None and self.impl == "triton":
            raise RuntimeError(f"impl='triton': deepopt has no fused step for {chain!r} "
                               "(deepopt.levels.fused lists them); use impl='foreach'")
        return fused

    def _state(self, p: Tensor, chain: Chain, group: Mapping[str, Any]) -> State:
        state = self.state[p]
        if "step" not in state:
            state.update(chain.init(p, group))
            dtype = state_dtype_for(p, group)
            if dtype is not None:
                _cast_state(state, dtype)
        return state

    # ------------------------------------------------------------------ introspection
    def memory_stats(self) -> dict[str, float]:
        """Root-mean-square over parameters of each memory buffer's norm, e.g.
        ``{"momentum/momentum_buffer_norm": 0.12}`` (for loggers such as LevelMonitor)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                chain = self._chain_for(p, group)
                if not state or "step" not in state or chain is None:
                    continue
                if any(is_dtensor(v) for v in state.values()):  # statistics of the whole tensor, every rank
                    state = {k: v.full_tensor() if is_dtensor(v) else v for k, v in state.items()}
                for k, v in chain.stats(state).items():
                    sums[k] = sums.get(k, 0.0) + v * v
                    counts[k] = counts.get(k, 0) + 1
        return {k: (sums[k] / counts[k]) ** 0.5 for k in sums}

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint after checking it was written by this optimizer for these shapes."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict expects the dict returned by optimizer.state_dict()")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: the checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}; build the optimizer with the same groups")
        needed = set(self.defaults) - self._optional_keys()
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            missing = sorted(needed - set(saved))
            if missing:
                raise ValueError(f"{name}: this checkpoint was not written by {name} (param group {i} lacks "
                                 f"{missing}); load it into the optimizer that saved it")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}: param group {i} has {len(saved['params'])} parameters in the "
                                 f"checkpoint but {len(group['params'])} here")
            for pid, p in zip(saved["params"], group["params"]):
                self._check_param_state(state_dict["state"].get(pid), p, {**group, **saved}, i)
        super().load_state_dict(state_dict)
        # torch casts state to the parameter's dtype; keep the checkpoint's (e.g. float32 state of
        # float16 parameters) so a resumed run continues exactly
        for saved_group, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for k, v in (state_dict["state"].get(pid) or {}).items():
                    now = self.state[p].get(k)
                    if (k != "step" and isinstance(v, Tensor) and isinstance(now, Tensor) and v.is_floating_point()
                            and now.dtype != v.dtype):
                        self.state[p][k] = v.to(device=now.device, copy=True)

    def _check_param_state(self, saved: Mapping[str, Any] | None, p: Tensor, group: Mapping[str, Any],
                           gi: int) -> None:
        if not saved:
            return
        name = type(self).__name__
        expected = {}
        chain = self._chain_for(p, group)
        if chain is not None and "step" in saved:
            expected.update(chain.init(p, group))
        if _SLOW_SUM in saved:
            expected[_SLOW_SUM], expected[_SLOW_CALLS] = p, torch.tensor(0.0)
        if set(saved) != set(expected):
            raise ValueError(f"{name}: the checkpoint's state for a parameter of shape {tuple(p.shape)} in group "
                             f"{gi} has keys {sorted(saved)}, expected {sorted(expected)}; it was written by "
                             "another optimizer or configuration")
        for k, v in saved.items():
            if isinstance(v, Tensor) and tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{name}: checkpoint state {k!r} has shape {tuple(v.shape)} but the parameter "
                                 f"needs {tuple(expected[k].shape)}; the model's shapes changed")


class _Part:
    """The parameters of one group that one chain steps (see :meth:`LevelOptimizer._plan`)."""

    __slots__ = ("chain", "positions", "fused", "full", "whole")

    def __init__(self, chain: Chain, positions: list[int]) -> None:
        self.chain, self.positions = chain, positions
        self.fused: Any = None
        self.full = False
        self.whole = False


class FlagReader:
    """The host's view of a non-finite flag: on CUDA an asynchronous copy into pinned memory and
    an event, started when the flag is made (before the step's kernels), so reading it later waits
    for that copy only, not for the kernels or for anything queued after them (no stream sync);
    on the CPU the flag itself.

    Example:
        >>> import torch
        >>> FlagReader(torch.tensor([1.0])).read(), FlagReader(torch.tensor([0.0])).read()
        (True, False)
    """

    def __init__(self, flag: Tensor) -> None:
        self.flag, self.event = flag, None
        if flag.is_cuda:
            self.flag, self.event = flag_to_host(flag)

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return flag_set(self.flag)


#: group values that enter a plan's key (floats such as lr never do)
_STRUCTURAL = (bool, int, str, type(None), torch.dtype)
#: attributes that are caches, not optimizer state (dropped by copy and pickle)
_UNPICKLED = ("_zero_grad_profile_name", "_plans")


def _is_fsdp1_flat(p: Tensor) -> bool:
    """Whether ``p`` is one of FSDP1's FlatParameters (many parameters flattened into one vector)."""
    return bool(getattr(p, "_is_flat_param", False))


def _cast_state(state: State, dtype: torch.dtype) -> None:
    """Convert a parameter's floating state (not its counters or slow-group sums) to ``dtype``."""
    for k, v in state.items():
        if k != "step" and not k.startswith("slow.") and v.is_floating_point() and v.dtype != dtype:
            state[k] = v.to(dtype)


def _in_state_dtype(ps: list[Tensor], gs: list[Tensor], states: list[State],
                    group: Mapping[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters and gradients to step: upcast copies where the state dtype is wider."""
    work, grads = list(ps), list(gs)
    if group.get("state_dtype") is None and torch.float16 not in set(map(_DTYPE, ps)):
        return work, grads  # (state_dtype_for is None for every parameter)
    for i, (p, state) in enumerate(zip(ps, states)):
        dtype = state_dtype_for(p, group)
        if dtype is None:
            continue
        _cast_state(state, dtype)  # e.g. state loaded by plain torch code, cast to p's dtype
        work[i] = p.detach().to(dtype)
        work[i].source = getattr(p, "source", p)  # levels keyed by parameter identity (DGD) look through
        grads[i] = gs[i].to(dtype)
    return work, grads
