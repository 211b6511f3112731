"""125M-parameter GPT-style model for an 8-GPU box or a v4-8/v5e-8 TPU slice.

Mesh: FSDP over all chips (fsdp=-1), data=1, tensor=1 — the usual choice at this size. bf16 compute.
On chips with 16-32 GiB (v4, v5e) add model.remat=dots or model.remat=block: one chip's 32 sequences of 1024
otherwise plan ~47 GiB (measured on an H200).
Use a real tokenizer: jaxckpt prepare --tokenizer tokenizer.json ... and set model.vocab_size.
"""

from jaxckpt.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_ff=2048, seq_len=1024,
                          tie_embeddings=True, dtype="bfloat16"),
        optim=OptimConfig(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
        data=DataConfig(batch_size=256, worker_count=4),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        train=TrainConfig(steps=100_000, log_every=50, eval_every=1000, eval_batches=20),
        checkpoint=CheckpointConfig(every_steps=1000, every_seconds=1800, keep_latest=3, keep_every=10_000,
                                    keep_best=1),
    )
