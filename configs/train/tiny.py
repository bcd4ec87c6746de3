"""A tiny LLaMA pretrained from scratch on the built-in corpus (36 modules of the Python standard
library, ``stdlib:``) with a byte-level tokenizer saved with the run: the smallest full run of
``train`` (loss falls within a few dozen steps; 0.23 s per step on 2 idle CPU cores, batch 8 x 512
tokens, ``benchmarks/train_mfu.py``).

    longrope-jax train --config tiny --out runs/tiny [--config.steps=200 ...]

Head dim 32 (16 rotary pairs), so a search on the result has pairs to work with; the window is
``seq_len`` (its ``max_position_embeddings``), so a LongRoPE search extends beyond it. A
pretraining recipe: the fine-tuning defaults' rate, schedule, betas and weight decay do not suit
a model trained from nothing.
"""

from . import default


def get_config():
    c = default.get_config()
    c.model_config = dict(vocab_size=258, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                          rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257,
                          rope_parameters={"rope_type": "default"})
    c.seq_len = 512
    c.batch = 8
    c.steps = 100
    c.lr = 3e-3
    c.warmup_steps = 10
    c.schedule = "cosine"
    c.end_lr_ratio = 0.1
    c.b2 = 0.95
    c.weight_decay = 0.01
    c.loss_chunk = 512
    c.checkpoint_every = 25
    # Held-out perplexity (with eval_every > 0) on English prose the code corpus lacks, inside the
    # window and at twice it.
    c.eval_data = ["pydoc:"]
    c.eval_lengths = [512, 1024]
    return c
