"""What every Lepton Dask worker imports as it starts (Dask's `distributed.worker.preload`, set in
`cluster.WORKER_DASK_CONFIG`): torch and `torch._dynamo` (which building a torch optimizer imports the first
time), the libraries that read a shard and write a checkpoint (pandas, pyarrow's Parquet reader, safetensors),
and the train stage's own modules.

Without it, each fresh worker paid those imports inside its first shard, on the train stage's clock. The run's
cluster starts beside ingest (the DAG's setup task), so the imports overlap the stages before train instead.
"""

from __future__ import annotations


def dask_setup(worker) -> None:  # Dask calls this once the module is imported
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch

    import lepton_tasks.train  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo now, not in the first shard
