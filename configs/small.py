"""Small: a real CPU demo (~11M params); loss falls visibly within minutes on 2 cores.

    jaxckpt prepare --input ../shared/data/tinyshakespeare.txt --out data/shakespeare
    jaxckpt train --config configs/small.py data.path=data/shakespeare
"""

from jaxckpt.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=256, d_model=384, n_layers=6, n_heads=6, d_ff=1024, seq_len=128),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1),
        data=DataConfig(batch_size=16, default_corpus_mb=16),
        train=TrainConfig(steps=600, log_every=10, eval_every=100, eval_batches=8),
        checkpoint=CheckpointConfig(every_steps=100, keep_latest=3),
    )
