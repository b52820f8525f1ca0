"""``ParallelDims``: the one object that knows the layout of the processes (pp x dp_replicate x dp_shard).

Ranks are laid out pipeline-major, as a ``("pp", "dp_replicate", "dp_shard")`` device mesh; ``dp`` is all
data-parallel ranks of a stage (``dp_replicate x dp_shard``, shard-minor)::

    world 4, pp 2, dp 2        dp rank 0   dp rank 1
        pp stage 0              rank 0      rank 1       <- a data-parallel group: same stage, other data
        pp stage 1              rank 2      rank 3
                                  ^ a pipeline (one replica): same data, consecutive stages

so the ranks of a data-parallel group are adjacent (one node when dp fits on a node) and a pipeline
crosses nodes only between stages. Everything else asks this object: the datamodule its data-parallel
coordinate, the strategy its stage and groups. Validation happens at construction, before anything is
allocated.

With virtual stages (``virtual = parallel.virtual_stages``) the ranks are the same; pipeline rank ``r`` holds
blocks ``r, r + pp, ...`` of the ``pp x virtual`` blocks (``model/stages.rank_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkflow_pl.config import check_virtual_stages


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    pp: int
    world_size: int
    num_layers: int | None = None  # checked against pp when given
    dp_shard: int = 1  # of dp: ranks a stage's parameters, gradients and optimizer state are sharded over
    virtual: int = 1  # parallel.virtual_stages: blocks per pipeline rank (block b on pipeline rank b % pp)

    def __post_init__(self) -> None:
        for key, v in (("parallel.dp", self.dp), ("parallel.pp", self.pp), ("parallel.virtual_stages", self.virtual)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}={v!r} must be a positive integer")
        if isinstance(self.dp_shard, bool) or not isinstance(self.dp_shard, int) or self.dp_shard < 1 \
                or self.dp % self.dp_shard:
            raise ValueError(f"parallel.dp_shard={self.dp_shard!r} must be a positive integer dividing the "
                             f"data-parallel degree {self.dp}")
        if self.dp * self.pp != self.world_size:
            # name the keys the user set: dp alone (replicas), or dp_replicate x dp_shard
            degrees = (f"parallel.dp_replicate x parallel.dp_shard x parallel.pp = {self.dp_replicate} x "
                       f"{self.dp_shard} x {self.pp}" if self.dp_shard > 1 else
                       f"parallel.dp x parallel.pp = {self.dp} x {self.pp}")
            fit = self.world_size // self.pp if self.world_size % self.pp == 0 else 1
            fix = (f"parallel.dp_shard={fit}" if self.dp_shard > 1 and self.dp_replicate == 1 else
                   f"parallel.dp={fit}")
            raise ValueError(
                f"{degrees} = {self.dp * self.pp} processes, but the run has {self.world_size} (trainer.devices x "
                f"trainer.num_nodes, or the launcher's world size): make them equal, e.g. {fix} or launch "
                f"{self.dp * self.pp} processes")
        if self.num_layers is not None and self.pp > self.num_layers:
            raise ValueError(f"parallel.pp={self.pp} is larger than the model's {self.num_layers} layers: each "
                             f"pipeline stage needs at least one layer; use parallel.pp <= {self.num_layers}")
        check_virtual_stages(self.virtual, self.pp, self.dp)
        if self.num_layers is not None and self.pp * self.virtual > self.num_layers:
            raise ValueError(f"parallel.pp x parallel.virtual_stages = {self.pp} x {self.virtual} blocks, but the "
                             f"model has {self.num_layers} layers: each block needs at least one layer; use "
                             f"parallel.virtual_stages <= {self.num_layers // self.pp}")

    @property
    def dp_replicate(self) -> int:
        """Replicas of a sharded group (``dp = dp_replicate x dp_shard``)."""
        return self.dp // self.dp_shard

    def coords(self, rank: int) -> tuple[int, int]:
        """``(pp_rank, dp_rank)`` of a global rank; ``dp_rank = replica x dp_shard + shard``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return divmod(rank, self.dp)

    def rank(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank

    def dp_group_ranks(self, pp_rank: int) -> list[int]:
        """Ranks holding stage ``pp_rank``: gradients of that stage are all-reduced over them."""
        return [self.rank(pp_rank, d) for d in range(self.dp)]

    def pp_group_ranks(self, dp_rank: int) -> list[int]:
        """The stages of one replica, in order."""
        return [self.rank(s, dp_rank) for s in range(self.pp)]

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard)

    @property
    def sharded(self) -> bool:
        """Whether a stage's data-parallel ranks run FSDP2 (``strategy/sharding.py``): any dp > 1."""
        return self.dp > 1

    MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard")


def world_from_launch(devices: int | str, num_nodes: int, dp: int, pp: int, env: dict[str, str]
                      ) -> tuple[int, int, bool]:
    """``(devices per node, num_nodes, launched externally)`` for Lightning's Trainer.

    torchrun (``LOCAL_WORLD_SIZE``/``WORLD_SIZE``) and SLURM's srun (``SLURM_NTASKS``) start the processes
    themselves; their numbers win, and an explicit ``trainer.devices``/``num_nodes`` that disagrees is an
    error. Otherwise Lightning starts ``devices x num_nodes`` processes; ``devices=auto`` means
    ``dp x pp / num_nodes``.
    """
    external = None
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        external = ("torchrun", local, max(world // max(local, 1), 1))
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", "1"))
        external = ("srun", max(world // max(nodes, 1), 1), nodes)
    if external is not None:
        name, local, nodes = external
        if devices not in ("auto", local, str(local)) or num_nodes not in (1, nodes):
            raise ValueError(f"{name} started {local} process(es) per node on {nodes} node(s), but the config asks "
                             f"for trainer.devices={devices} trainer.num_nodes={num_nodes}: drop those overrides "
                             f"(they are taken from {name})")
        return local, nodes, True
    if devices == "auto":
        total = dp * pp
        if total % num_nodes:
            raise ValueError(f"the parallel degrees (dp_replicate x dp_shard x pp) = {total} processes do not split "
                             f"over trainer.num_nodes={num_nodes}; set trainer.devices explicitly")
        return total // num_nodes, num_nodes, False
    try:
        n = int(devices)
    except (TypeError, ValueError):
        raise ValueError(f"trainer.devices={devices!r} must be an integer or auto") from None
    if n < 1:
        raise ValueError(f"trainer.devices={devices!r} must be >= 1 (or auto)")
    return n, num_nodes, False
