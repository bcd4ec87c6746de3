"""Every setting of ``longrope-jax train`` with its default: one fine-tuning stage with the paper's
recipe for LLaMA-2 (AdamW 0.9 / 0.999, eps 1e-8, lr 2e-5 after 20 warmup steps with linear decay,
clipping 1.0, no weight decay, 400 steps of 32 rows; ``docs/method.md``).

    longrope-jax train --model PATH --config.seq_len=131072 --out RUN [--rope FACTORS.json]

``tiny`` (a model from scratch) and ``smollm2_16k`` build on it.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from .. import common


def get_config():
    c = ml_collections.ConfigDict()
    common.add_model(c)  # unset model: a model from scratch, as model_config says
    c.model_config = {}  # ModelConfig fields of a model trained from scratch
    c.init_seed = 0  # its initialisation
    c.rope = "model"  # fixed for the stage: a --rope value or a factors file
    c.data = ["stdlib:"]  # text file, .jsonl, directory, ArrayRecord, stdlib:, pydoc:, tfds:NAME
    c.field = "text"
    c.prepared = placeholder(str)  # a prepare-data directory of this stage's rows: read instead (data is not)
    c.seq_len = placeholder(int)  # tokens per row: the stage's length; required
    c.min_document_tokens = 0  # shorter documents are left out (long stages want long documents)
    c.packing = False  # rows hold whole documents (segment ids, positions from 0) instead of a cut stream
    # LongRoPE2's mixed context windows: this many of each step's accum microbatches are short:
    # documents within the model's own window, packed into rows of it, under its original RoPE;
    # the others hold the longer documents under the stage's RoPE.
    c.short_microbatches = 0
    # Positional skips (PoSE): rows of seq_len tokens whose positions span skip_to (unset: no
    # skips), cut into skip_chunks chunks moved by sorted random skips; the stage trains with its
    # factors' long set, fixed for that span.
    c.skip_to = placeholder(int)
    c.skip_chunks = 2
    c.batch = 32  # rows per step
    c.accum = 1  # microbatches per step (batch / accum rows each)
    c.steps = 400
    c.lr = 2e-5
    c.warmup_steps = 20
    c.schedule = "linear"  # linear | cosine | constant after the warmup
    c.end_lr_ratio = 0.0  # the rate at the last step, over lr
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0
    c.clip_norm = 1.0  # global-norm clipping; 0: off
    c.seed = 0  # the data order: step t's batch depends only on (seed, t)
    c.dtype = "float32"  # compute dtype
    c.remat = "none"  # none | full | dots | attention
    c.attention = "blockwise"  # auto | dense | blockwise | ring | ring_splash (auto: select.pick, logged)
    c.q_chunk = placeholder(int)  # attention block; unset: min(512, seq_len)
    c.loss_chunk = 1024
    c.checkpoint_every = 50
    c.keep = 3  # checkpoints kept (and the final one)
    # Held-out perplexity every eval_every steps (0: off) on eval_samples windows per length.
    c.eval_every = 0
    c.eval_data = placeholder(list)
    c.eval_lengths = placeholder(list)
    c.eval_samples = 1
    c.out = placeholder(str)  # the run directory; required
    common.add_mesh(c)
    return c
