"""1B-parameter model for a v4-32 / v5p-32 TPU slice or 8+ GPUs.

Mesh: FSDP within a slice plus 2-way tensor parallelism (tensor=2), data across the rest.
On an 8-GPU box: mesh.data=1 mesh.fsdp=4 mesh.tensor=2 (16 chips: mesh.data=2).
Activations are rematerialised per block (model.remat="block"): without it one chip's share of this batch
needs several times its memory (XLA on the CPU plans 130 GiB of temporaries for 8 sequences of 2048
on one device; 9 GiB with remat).
The 18 blocks run as one lax.scan (model.scan_layers=True): unrolled, XLA on an H200 did not finish compiling
the step in 4.5 min even with remat; scanned it compiles in 16 s (benchmarks/README.md, section 5).
"""

from jaxckpt.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=32768, d_model=2048, n_layers=18, n_heads=16, d_ff=5632, seq_len=2048,
                          tie_embeddings=False, dtype="bfloat16", remat="block", scan_layers=True),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
        data=DataConfig(batch_size=512, worker_count=8),
        mesh=MeshConfig(data=-1, fsdp=4, tensor=2),
        train=TrainConfig(steps=200_000, log_every=50, eval_every=2000, eval_batches=20),
        checkpoint=CheckpointConfig(every_steps=1000, every_seconds=1800, keep_latest=2, keep_every=20_000),
    )
