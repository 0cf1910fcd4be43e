"""FSDP2 (``torch.distributed.fsdp.fully_shard``) applied to a model from outside, torchtitan-style.

``parallelize_fsdp2`` shards each transformer block as its own unit (its parameters are gathered
just before the block runs and freed after it) and then the root module (embeddings, final norm
and the head, tied or not). ``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with a
purely data-parallel mesh over every process, so it runs on CPU (gloo) as well as on GPUs (nccl).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm_lightning.training.lightning_internals import set_data_parallel_degree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with one data-parallel dimension spanning all processes of all nodes.

    Lightning's default (``data_parallel_size="auto"``) is one data-parallel group per node, meant for
    2-D FSDP + tensor parallelism; pure FSDP2 wants every process in the data-parallel group.
    The sharding itself is applied by the task's ``configure_model`` hook (``parallelize_fsdp2``).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.data_parallel_over_all_processes = kwargs.get("data_parallel_size", "auto") == "auto"

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # meta.pt holds what a single-file checkpoint holds (RNG states, loops): read as safely (weights_only)
        from lm_lightning.training.checkpoint_io import load_checkpoint_file

        if (Path(checkpoint_path) / "meta.pt").is_file():
            load_checkpoint_file(Path(checkpoint_path) / "meta.pt", name=checkpoint_path)  # refuses code, before the shards
        return super().load_checkpoint(checkpoint_path, weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written into ``<name>.tmp`` by every rank and then renamed into place, the one it
        replaces kept as ``<name>.prev``: a kill while the ranks write leaves the previous checkpoint whole (Lightning
        writes into the folder in place, over the old shards), and no shard of an earlier, larger world size stays."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        from lm_lightning.training.checkpoint_io import replace_folder

        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(path.name + ".tmp")
        if self.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # a save that was killed
        self.barrier("fsdp2_save_start")
        super().save_checkpoint(checkpoint, staging, storage_options=storage_options)
        self.barrier("fsdp2_save")
        if self.global_rank == 0:
            replace_folder(staging, path)
        self.barrier("fsdp2_saved")

    def setup_environment(self) -> None:
        if self.data_parallel_over_all_processes:  # known only now that the Trainer has set devices and nodes
            set_data_parallel_degree(self, self.num_nodes * self.num_processes)
        super().setup_environment()


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, its activations recomputed in the backward pass instead of kept."""
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def parallelize_fsdp2(
    model: nn.Module,
    device_mesh: Any,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    param_dtype: str | None = None,
    reduce_dtype: str | None = None,
) -> nn.Module:
    """Shards ``model`` in place with FSDP2: every block it declares (``model.blocks()``), then the root.

    ``device_mesh``: Lightning's mesh (its ``data_parallel`` dimension is used) or a 1-D mesh.
    ``param_dtype`` / ``reduce_dtype``: dtype names for FSDP2's mixed precision (e.g. ``bfloat16``
    on GPUs: parameters all-gathered in bf16, gradients reduced in fp32); None keeps fp32.
    ``activation_checkpointing``: recompute each block's activations in the backward pass.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh
    if mesh is not None and mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        mesh = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
    )
    layers = model.blocks()
    for i, block in enumerate(layers):
        if activation_checkpointing:
            # the block itself stays in place (its state-dict keys and FSDP2's hooks unchanged); only its forward
            # runs under torch.utils.checkpoint, called inside the hooks, as torch's checkpoint_wrapper does
            block.forward = MethodType(_checkpointed_forward, block)
        # the last block's parameters are needed again first in backward: keep them gathered
        last = i == len(layers) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and not last, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model
