"""The engine a run trains under, chosen by how it was launched; dpo-train hands it the step module.

``dpo-train RECIPE`` is one process. Under ``accelerate launch`` (with the user's accelerate config) or
``torchrun`` accelerate picks the engine: DDP (several processes, the default), FSDP version 2
(``fully_shard``) or DeepSpeed ZeRO (stages 1 to 3). The loop prepares the step module and its optimizer
with it (``accelerator.prepare``); the engine then does the gradient synchronisation (once per optimizer
step), the sharding and the mixed precision. This module:

* builds the ``Accelerator`` from the recipe (gradient accumulation, fp16 loss scaling) and refuses what an
  engine cannot do with it (:func:`build_accelerator`);
* on a machine without an accelerator (CPU runs: tests, debugging) selects FSDP or DeepSpeed itself, which
  accelerate does only with one: FSDP2 over gloo is the same ``fully_shard``, and DeepSpeed is told gloo
  as its backend;
* gathers the trainable state (adapter and optimizer) to full tensors for checkpoints and the saved
  adapter, loads full tensors back into a sharded model, and sends what the main process read to the
  others (:func:`full_adapter`, :func:`full_optimizer_state`, :func:`load_full_state`, :func:`broadcast`),
  so a checkpoint has one format whatever the engine and process count, and a run on several machines
  resumes from the main machine's disk.

The frozen LM head: the log-prob kernel needs its whole ``[V, H]`` weight and reads it without calling the
head's forward, so under FSDP the head stays in the step module's root unit, gathered by the root's hooks
when the step's forward starts and freed after its backward (see :class:`dpo.model.SequenceLogprobs`; the
memory plan counts it: :func:`dpo.model.memory.estimate_sharded`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from dpo.recipe import Recipe

Log = Callable[[str], None]

# Optimizers whose state is per whole tensor (a quantized moment with block scales): an engine that shards
# the tensors (FSDP, DeepSpeed) cannot hand them one.
_WHOLE_TENSOR_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


class EngineError(ValueError):
    """A launch configuration dpo-train cannot train under; the message says what to change."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def build_accelerator(recipe: Recipe, timeout: timedelta):
    """The run's ``accelerate.Accelerator``, with the engine the launch chose, checked against the recipe.

    Args:
        recipe: the run (gradient accumulation, loss scaling, optimizer, batch sizes, clipping).
        timeout: how long a collective waits for the other processes (see dpo.train.loop.SETUP_TIMEOUT).

    Raises:
        EngineError: FSDP version 1, an 8-bit optimizer under a sharding engine, or a DeepSpeed config with
            its own optimizer or scheduler.
    """
    import torch.cuda
    from accelerate import Accelerator, PartialState
    from accelerate.utils import (
        AutocastKwargs,
        DistributedType,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
    )

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    no_accelerator = not torch.cuda.is_available()
    if deepspeed and launched and no_accelerator:
        # accelerate starts DeepSpeed only with an accelerator's collective library; name gloo instead (what
        # DeepSpeed's CPU backend uses without oneCCL), and let gloo do every collective: DeepSpeed would
        # otherwise compile its shared-memory collective op first (C++, minutes on a fresh machine).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        PartialState(backend="gloo", timeout=timeout)
    accelerator = Accelerator(gradient_accumulation_steps=recipe.train.grad_accum,
                              mixed_precision="fp16" if recipe.train.loss_scaler else "no",
                              cpu=launched and no_accelerator and not deepspeed,
                              # The recipe's dtypes hold: fp16 "mixed precision" only runs the loss scaler,
                              # it does not autocast the forward.
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout), AutocastKwargs(enabled=False)])
    state = accelerator.state
    if _flag("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU:
        # accelerate selects FSDP only on accelerators; on CPU processes it is the same fully_shard over gloo.
        # Both states hold the engine: accelerate copies the process state's into the accelerator's again.
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    kind = engine_name(accelerator)
    check_engine(kind, recipe)
    if kind.startswith("deepspeed"):
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, recipe, accelerator.num_processes)
    return accelerator


def check_engine(kind: str, recipe: Recipe) -> None:
    """Refuse what engine ``kind`` (:func:`engine_name`) cannot train as the recipe asks.

    Raises:
        EngineError: FSDP version 1; an 8-bit optimizer under FSDP or DeepSpeed (its state is per whole tensor).
    """
    if kind == "fsdp1":
        raise EngineError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(recipes/accelerate/fsdp2.yaml is an example)")
    if kind not in ("single", "ddp") and recipe.train.optimizer in _WHOLE_TENSOR_OPTIMIZERS:
        raise EngineError(f"train.optimizer: {recipe.train.optimizer} keeps its state per whole tensor, which "
                          f"{kind} shards across the processes; use adamw (sharded, its state costs each process "
                          "a share of what one process pays)")


def configure_deepspeed(config: dict[str, Any], recipe: Recipe, processes: int) -> None:
    """Fill a DeepSpeed config (in place) from the recipe: batch sizes, accumulation, clipping, precision.

    Raises:
        EngineError: the config has its own optimizer or scheduler section.
    """
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise EngineError(f"the DeepSpeed config has an '{section}' section; dpo-train builds the optimizer and "
                              "the learning-rate schedule from the recipe's train section: remove it")
    train = recipe.train
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["train_batch_size"] = train.batch_size * train.grad_accum * processes
    config["gradient_clipping"] = train.max_grad_norm or 0.0
    # The recipe's dtypes hold, as on one GPU: the base in model.dtype, the adapter in float32; fp16 compute
    # only with the loss scaler.
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": bool(train.loss_scaler)}


def engine_name(accelerator) -> str:
    """``single``, ``ddp``, ``fsdp2`` (``fsdp1``: refused) or ``deepspeed-zeroN``."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{state.deepspeed_plugin.zero_stage}"
    return "single" if accelerator.num_processes == 1 else "ddp"


def describe_engine(accelerator) -> str:
    """One line for the log: the engine, how many processes on how many machines, the device."""
    kind = engine_name(accelerator)
    names = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2 (fully_shard)"}
    name = names.get(kind, kind.replace("deepspeed-zero", "DeepSpeed ZeRO-"))
    if kind == "single":
        return f"{name} on {accelerator.device}"
    machines = max(1, accelerator.num_processes // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return (f"{name}, {accelerator.num_processes} processes on {machines} machine{'s' if machines > 1 else ''} "
            f"({accelerator.device.type})")


def shards_parameters(accelerator) -> bool:
    """Whether every forward is a collective (weights gathered from all processes): FSDP, DeepSpeed ZeRO-3."""
    return engine_name(accelerator) in ("fsdp2", "deepspeed-zero3")


def no_grad_module(accelerator, prepared: torch.nn.Module) -> torch.nn.Module:
    """The module a pass without gradients runs (evaluation, the reference precompute).

    Under an engine that shards parameters only the prepared module has every weight; otherwise the step
    module itself, whose forward involves no other process (DDP's wrapper would synchronise buffers on
    every call), so each process can run its own number of batches.
    """
    if shards_parameters(accelerator) or accelerator.num_processes == 1:
        return prepared
    return prepared.module  # DDP's and DeepSpeed's wrappers keep the step module as .module


def place_quant_states(model: torch.nn.Module, device: torch.device) -> None:
    """Move each 4-bit weight's quantization state (scales, code book) to the device the engine computes on.

    bitsandbytes keeps it beside the module, not as a parameter or buffer, so an engine that moves a model
    loaded on the CPU (FSDP moves each shard to its device, or with offloading each gathered weight) does not
    move it; the matmul needs it beside the codes. Nothing to do for a model without 4-bit weights.
    """
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            state.to(device)


def gather_head_with_step(accelerator, prepared: torch.nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, make the step's forward gather the LM head.

    ZeRO-3 gathers a module's weights when that module's forward runs; the log-prob kernel reads the head's
    weight without calling the head. Registered as an external parameter of the step module, the head is
    gathered for the step's forward and backward, as FSDP's root unit holds it. (A reward model calls its
    score head, and a sequence-classification model has no LM head: nothing to do.)
    """
    if engine_name(accelerator) != "deepspeed-zero3":
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    step = prepared.module
    model = getattr(step, "model", None)
    head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
    if head is not None:
        register_external_parameter(step, head.weight)


# ------------------------------------------------------------------------------------- full state


def _deepspeed(accelerator) -> bool:
    return engine_name(accelerator).startswith("deepspeed")


def _full(tensor: Tensor) -> Tensor:
    """A (possibly sharded) tensor as one full CPU tensor; a collective for a sharded one."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def full_adapter(accelerator, model: torch.nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The trainable parameters as full CPU tensors, by ``named_parameters()`` name, as one process has them.

    A collective under FSDP and DeepSpeed: every process calls it, in step, and gets the same values.

    Args:
        accelerator: the run's accelerator.
        model: the peft model.
        names: the trainable parameters' names.
    """
    params = dict(model.named_parameters())
    if _deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(params[name]).detach().cpu() for name in names}
    return {name: _full(params[name]) for name in names}


def full_optimizer_state(accelerator, model: torch.nn.Module, optimizer, names: list[str]) -> dict[str, Any]:
    """The optimizer's state dict with full CPU tensors, in the layout of ``torch.optim.Optimizer.state_dict()``
    (state keyed by parameter index, in ``names`` order). A collective, like :func:`full_adapter`."""
    inner = inner_optimizer(optimizer)
    if _deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_optimizer_state

        params = dict(model.named_parameters())
        step = next((entry["step"] for entry in inner.state.values() if "step" in entry), None)
        state = {}
        for index, name in enumerate(names):
            entry = {key: safe_get_full_optimizer_state(params[name], key).detach().cpu()
                     for key in ("exp_avg", "exp_avg_sq")}
            state[index] = {"step": step.detach().cpu().clone(), **entry} if step is not None else entry
        groups = [{key: value for key, value in group.items() if key != "params"} for group in inner.param_groups]
        return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(names)))}]}
    state_dict = inner.state_dict()
    state = {index: {key: _full(value) if isinstance(value, Tensor) else value for key, value in entry.items()}
             for index, entry in sorted(state_dict["state"].items())}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def load_full_state(accelerator, model: torch.nn.Module, optimizer, names: list[str], adapter: dict[str, Tensor],
                    optimizer_state: dict) -> None:
    """Load full tensors (from :func:`full_adapter` and :func:`full_optimizer_state`, or a checkpoint) into the model and optimizer, each process
    keeping its own shard. Every process calls it with the same values."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    if _deepspeed(accelerator):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if engine_name(accelerator) == "deepspeed-zero3":
            raise EngineError("resuming under DeepSpeed ZeRO-3 is not supported (its optimizer state cannot be set "
                              "from full tensors before a first step); resume the checkpoint under FSDP2 or ZeRO-2 "
                              "with --force (recipes/accelerate/fsdp2.yaml): it holds full tensors")
        inner = inner_optimizer(optimizer)
        if not inner.state:
            _create_optimizer_state(optimizer)
        saved_group = {key: value for key, value in optimizer_state["param_groups"][0].items() if key != "params"}
        for group in inner.param_groups:  # the learning rate where the schedule was, the other settings as saved
            group.update({key: value for key, value in saved_group.items() if key in group})
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        for index, name in enumerate(names):
            # The module's weight (gathered and partitioned again under ZeRO-3) and the optimizer's float32 copy.
            with GatheredParameters([params[name]], modifier_rank=0), torch.no_grad():
                params[name].data.copy_(adapter[name].to(params[name].device, params[name].dtype))
            safe_set_full_fp32_param(params[name], adapter[name].to(accelerator.device))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(params[name], optimizer_state["state"][index][key].to(accelerator.device),
                                              key)
        step = optimizer_state["state"].get(0, {}).get("step")
        for entry in inner.state.values():
            if step is not None and "step" in entry:
                entry["step"] = step.clone().to(entry["step"].device)
        return

    def local(full: Tensor, like: Tensor) -> Tensor:
        """``full`` as a tensor like ``like``: this process's shard of it when ``like`` is sharded."""
        full = full.to(device=like.device, dtype=like.dtype)
        if isinstance(like, DTensor):
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return full

    with torch.no_grad():
        for name in names:
            param = params[name]
            value = local(adapter[name], param)
            (param.to_local() if isinstance(param, DTensor) else param).copy_(
                value.to_local() if isinstance(value, DTensor) else value)
    state = {}
    for index, entry in optimizer_state["state"].items():
        param = params[names[int(index)]]
        state[int(index)] = {key: local(value, param) if isinstance(value, Tensor) and value.dim() > 0 else value
                             for key, value in entry.items()}
    inner_optimizer(optimizer).load_state_dict({"state": state, "param_groups": optimizer_state["param_groups"]})


def _create_optimizer_state(optimizer) -> None:
    """Give DeepSpeed's optimizer the state a first step creates, so that a checkpoint's can be written into it.

    AdamW creates its moments at its first step: one step with zero gradients and a learning rate of 0 creates
    them without moving a parameter (the values are then overwritten), and DeepSpeed then links each
    parameter's slice of them, as after any step.
    """
    inner = inner_optimizer(optimizer)
    rates = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    inner.step()
    for group, rate in zip(inner.param_groups, rates, strict=True):
        group["lr"] = rate
        for param in group["params"]:
            param.grad = None
    wrapper = optimizer
    while hasattr(wrapper, "optimizer") and wrapper.optimizer is not inner:
        wrapper = wrapper.optimizer
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 link lazily
    if link is not None:
        link()


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (and DeepSpeed's) wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# ------------------------------------------------------------------------------- main -> others


def broadcast(accelerator, value: Any) -> Any:
    """``value`` as the main process has it, on every process (the others pass anything, e.g. None).

    Nested dicts, lists and tuples are sent as one object; the tensors in them one at a time, on the
    accelerator's device (never the whole state pickled at once), and come back on the CPU.
    """
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist
    from accelerate.utils import broadcast_object_list

    tensors: list[Tensor] = []

    def strip(item):
        if isinstance(item, Tensor):
            tensors.append(item)
            return ("__tensor__", len(tensors) - 1, str(item.dtype).removeprefix("torch."), tuple(item.shape))
        if isinstance(item, dict):
            return {key: strip(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(strip(v) for v in item)
        return item

    skeleton = [strip(value) if accelerator.is_main_process else None]
    broadcast_object_list(skeleton, from_process=0)
    received: list[Tensor] = []

    def fill(item):
        if isinstance(item, tuple) and len(item) == 4 and item[0] == "__tensor__":
            return received[item[1]]
        if isinstance(item, dict):
            return {key: fill(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(fill(v) for v in item)
        return item

    def shapes(item, found):
        if isinstance(item, tuple) and len(item) == 4 and item[0] == "__tensor__":
            found[item[1]] = (getattr(torch, item[2]), item[3])
        elif isinstance(item, dict):
            for v in item.values():
                shapes(v, found)
        elif isinstance(item, (list, tuple)):
            for v in item:
                shapes(v, found)
        return found

    layout = shapes(skeleton[0], {})
    for index in range(len(layout)):
        dtype, shape = layout[index]
        if accelerator.is_main_process:
            buffer = tensors[index].detach().to(accelerator.device).contiguous()
        else:
            buffer = torch.empty(shape, dtype=dtype, device=accelerator.device)
        dist.broadcast(buffer, src=0)
        received.append(buffer.cpu())
    return fill(skeleton[0])
