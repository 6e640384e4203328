"""BSMamba2 on MUSDB18-HQ vocals: the paper's model and the authors' training schedule.

    python train.py --config=configs/bsmamba2.py           # the paper recipe
    python train.py --config=configs/bsmamba2.py:demo      # small model, synthetic data, CPU
    configs/bsmamba2.py:tiny                               # the tests' model

`get_config()` builds the paper config; each other variant is one override block below
(`_demo`, `_tiny`) that changes only what differs. Derived values (samples from seconds, ...) are
computed in code, so `--config.x=y` reaches them. `bsmamba2_jax.train.config_check` checks every
value at start and names the field and the allowed range of a bad one.
"""

from __future__ import annotations

import ml_collections

# 62 bands over the 1025 STFT bins, low to high (paper Sec. III-A; docs/DESIGN.md#model):
# 24x2, 12x4, 8x12, 8x24, 8x48, 128, 129.
PAPER_BAND_WIDTHS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)


def _model() -> ml_collections.ConfigDict:
    """Keyword arguments of `bsmamba2_jax.model.BSMamba2`: the paper model."""
    m = ml_collections.ConfigDict()
    m.dim = 256  # D, feature size of every band token
    m.depth = 6  # L, dual-path layers (time pass then band pass)
    m.band_widths = PAPER_BAND_WIDTHS  # bins per band; must sum to n_fft // 2 + 1
    m.n_fft = 2048  # STFT size (= window length), bins = n_fft // 2 + 1
    m.hop_length = 441  # STFT hop in samples (10 ms at 44.1 kHz)
    m.expand = 4  # Mamba2 d_inner = expand * dim
    m.d_state = 128  # N, SSD state size
    m.headdim = 64  # P, SSD head size; heads = expand * dim / headdim
    m.ngroups = 1  # B/C groups shared by heads
    m.d_conv = 4  # depthwise causal conv kernel
    # SSD chunk along time (sequences of ~801 frames for 8 s). A cost knob only: the output is the
    # same for any chunk; 256 is mamba_ssm's default, 128 costs ~10% less CPU time ("xla" impl).
    m.chunk_size = 256
    m.band_chunk_size = 64  # SSD chunk along bands: sequences are only 62 long
    m.mask_hidden_mult = 4  # mask estimator hidden size = mult * dim
    m.ssd_impl = "xla"  # "xla" (chunked JAX), "scan" (reference), "pallas_triton" / "pallas_mosaic"
    # (GPU kernels; Mosaic GPU: sm_90), "pallas" (the default Pallas backend: Triton for now)
    m.dtype = "bfloat16"  # compute dtype of matmuls/convs; params, SSD state, norms stay float32
    # What the backward pass recomputes instead of keeping: "none" (fastest, most memory),
    # "layer" (each dual-path layer), "block" (each bidirectional block, per group of sequences:
    # least memory). Both cost one extra forward pass. False/True are "none"/"layer". The
    # paper's 5 x 8 s per device needs "block": a train step at 8 s keeps 13.2 GiB of
    # temporaries per example-second with "none" (and with "layer"), 0.35 GiB with "block"
    # (benchmarks/RESULTS.md, Training).
    m.remat = "block"
    # The time and band passes run their sequences in groups of at most this many tokens
    # (sequences x length), one group after the other: intermediates scale with it, not with
    # batch x segment length. 0: all sequences at once. The output does not depend on it.
    m.group_tokens = 16384
    return m


def _data() -> ml_collections.ConfigDict:
    """Where the audio comes from and how examples are drawn (docs/DESIGN.md#data)."""
    d = ml_collections.ConfigDict()
    d.root = ""  # MUSDB18-HQ root; "" = synthetic MUSDB18-HQ-shaped set generated in the workdir
    d.sample_rate = 44100  # Hz; every file must have it
    d.segment_seconds = 8.0  # training/validation segment length (8 s = 352,800 samples)
    # Global micro-batch over all processes (paper: 5 per GPU x 2 GPUs); each process draws
    # batch_size // process_count of it. Gradient accumulation (6 in the paper, effective 60)
    # is config.optim.accum_steps.
    d.batch_size = 10
    # Random mixes per epoch: the authors' `num_steps: 6000` (train_dataset config), i.e.
    # 600 micro-batches of 10 = 100 optimizer updates of 60 per epoch.
    d.examples_per_epoch = 6000
    d.silence_prob = 0.1  # each stem (the vocal target too) is replaced by silence this often
    d.gain_min = 0.5  # each stem's gain is uniform in [gain_min, gain_max]
    d.gain_max = 1.5
    # Source activity detection (authors' sad config): windows of one segment, hop = fraction *
    # segment, 10 chunks, threshold max(15th percentile of the chunk RMS, 1e-3), keep > 50%.
    d.activity_step_fraction = 0.5  # 4 s hop for 8 s windows
    d.activity_chunks = 10  # chunks per window
    d.activity_quantile = 0.15  # per-window chunk-RMS percentile used as threshold
    d.activity_rms_floor = 1e-3  # threshold floor (chunk RMS, full scale = 1)
    d.activity_min_fraction = 0.5  # keep a window if more than this fraction of chunks is loud
    # Validation: this many windows drawn at random (with replacement, seeded by config.seed)
    # from the vocal-active windows of the validation tracks; mixture = sum of the four stems at
    # the same samples (the authors' val_dataset: num_steps 1200, aligned sources).
    d.validation_windows = 1200
    d.num_workers = 4  # Grain mp_prefetch worker processes; 0 = read in the main process
    d.worker_buffer_batches = 2  # batches each worker prepares ahead
    d.read_threads = 2  # threads per process reading batches (soundfile releases the GIL)
    d.prefetch_batches = 2  # batches read ahead per process (memory: ~28 MB per paper batch)
    # Synthetic set (used when root == ""): written to WORKDIR/synthetic on first use.
    d.synthetic_tracks = 16  # tracks in synthetic/train, validation ones included
    d.synthetic_valid_tracks = 3  # of those, the validation split
    d.synthetic_test_tracks = 4  # tracks in synthetic/test
    d.synthetic_seconds = 30.0  # length of every synthetic track
    d.synthetic_seed = 0  # the synthetic set is a pure function of this seed and the sizes
    return d


def _paper() -> ml_collections.ConfigDict:
    """The paper model and the authors' schedule (their Hydra config, callbacks and Lightning
    module; docs/DESIGN.md#loss-and-recipe).

    Steps count micro-batches (train-step calls) of config.data.batch_size examples (global, over
    all devices); an optimizer update happens every optim.accum_steps of them. One epoch =
    examples_per_epoch / batch_size = 600 micro-batches = 100 updates; the authors' Trainer runs
    up to 2000 epochs and validates after each.

    Total: 1,200,000 micro-batches = 200,000 updates = 12 M examples of 8 s. On one H100 that is
    ~35 h at 100% of its dense bf16 rate (989 TFLOP/s), ~118 h at a more typical 30%: an
    ESTIMATE from 105 TFLOP per micro-batch of 10 x 8 s (3x the forward's matmul FLOPs,
    `python benchmarks/train_cost.py`) x 1.2 M, not a GPU measurement. The paper
    trained on 2 x A100 80GB.

    Where this differs from the authors' run, and why:
      - validation windows are drawn once (seeded) and reused at every validation, where the
        authors' loader draws 1200 new ones each epoch: fixed windows make the scores of two
        steps comparable, which checkpoint selection relies on;
      - the EMA is updated once per optimizer update, as theirs (EMAOptimizer wraps the
        optimizer's step), but our bf16 is a compute dtype (params stay float32), where
        Lightning's `precision: bf16` is autocast: the same policy in different words.
    """
    config = ml_collections.ConfigDict()
    config.seed = 42  # the authors' pl.seed_everything(42)
    config.model = _model()
    config.data = _data()
    config.init_from = ""  # fine-tune: initial params + EMA from a model (see train.py); "" = off

    config.total_steps = 1_200_000  # micro-batches: 2000 epochs x 600
    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 5e-4  # AdamW learning rate, constant (no schedule)
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8  # AdamW epsilon (PyTorch default)
    config.optim.weight_decay = 0.01  # decoupled, on every parameter as torch.optim.AdamW
    config.optim.clip_norm = 3.0  # global-norm gradient clip of the accumulated gradient; 0 = off
    config.optim.accum_steps = 6  # micro-batches per update: 10 x 6 = effective batch 60
    config.ema_decay = 0.999  # EMA of the weights, per optimizer update; validation uses it

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel size; -1 = all devices // fsdp
    config.mesh.fsdp = 1  # >1 splits params/EMA/optimizer state over this many devices
    config.mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated

    config.log_every = 100  # micro-batches between progress lines / metric records
    config.eval_every = 600  # micro-batches between validations (EMA weights): every epoch;
    #                          0 = only at the end
    config.eval_batch_size = 10  # validation windows per forward pass (global)
    config.ckpt_every = 600  # micro-batches between resume checkpoints (always one at the end)
    config.keep_checkpoints = 3  # newest resume checkpoints kept in WORKDIR/checkpoints
    # Checkpoint selection (the authors' two ModelCheckpoint callbacks): the `keep_best` steps
    # with the lowest validation loss (WORKDIR/best_loss) and the highest validation uSDR
    # (WORKDIR/best_usdr) keep their raw and EMA weights; the last step is in checkpoints/.
    config.keep_best = 4
    config.async_checkpointing = True  # write checkpoints in the background
    config.max_nonfinite_run = 20  # stop after this many non-finite micro-batches in a row
    config.compilation_cache = True  # persistent XLA cache in WORKDIR/jax_cache
    config.tensorboard = True  # TensorBoard events in WORKDIR/tensorboard
    # Validation windows shown in TensorBoard at each validation (chosen once per run from the
    # seed, preferring a vocal onset after a silence): 4 s of mixture, reference and estimate as
    # mid (mono) 44.1 kHz audio and one mel-spectrogram image each; 0 = scalars only. Each
    # validation adds ~0.4 MB per window (the estimate's audio and the image).
    config.tensorboard_examples = 4
    return config


def _demo(config: ml_collections.ConfigDict) -> None:
    """Small model, short run on the synthetic set: finishes in < 10 min on a 2-core CPU, data
    generation and compilation included (~0.5 s per step)."""
    config.model.update(dim=32, depth=1, expand=2, d_state=16, headdim=16, chunk_size=64,
                        band_chunk_size=16, dtype="float32", remat="none")
    config.model.band_widths = (16,) * 4 + (32,) * 4 + (64, 64, 256, 449)  # 12 bands
    config.data.update(segment_seconds=1.0, batch_size=4, examples_per_epoch=1000,
                       validation_windows=128,
                       num_workers=0,  # 2-core CPU: the model needs the cores more than reading
                       read_threads=1)
    config.total_steps = 300
    config.optim.lr = 3e-3  # small model, short run: a larger step than the paper's
    config.optim.accum_steps = 1
    config.ema_decay = 0.99  # a short run: EMA must follow within ~100 updates
    config.log_every = 25
    config.eval_every = 150
    config.eval_batch_size = 8
    config.ckpt_every = 100
    config.keep_best = 1


def _tiny(config: ml_collections.ConfigDict) -> None:
    """The tests' model: one dual-path layer of width 32 over 6 wide bands, a few steps."""
    config.model.update(dim=32, depth=1, expand=2, d_state=16, headdim=16, chunk_size=64,
                        band_chunk_size=16, dtype="float32", remat="none")
    config.model.band_widths = (16, 32, 64, 128, 256, 529)
    config.data.update(segment_seconds=1.0, batch_size=4, examples_per_epoch=64,
                       validation_windows=4, num_workers=0, read_threads=1,
                       # The tests' `synthetic_root` fixture has these sizes (tests/conftest.py).
                       synthetic_tracks=4, synthetic_valid_tracks=1, synthetic_test_tracks=2,
                       synthetic_seconds=6.0)
    config.total_steps = 6
    config.optim.accum_steps = 2
    config.ema_decay = 0.9
    config.log_every = 1
    config.eval_every = 0
    config.eval_batch_size = 8
    config.ckpt_every = 3
    config.keep_best = 2
    config.compilation_cache = False
    config.tensorboard = False


VARIANTS = {"": None, "demo": _demo, "tiny": _tiny}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "" (paper), "demo" (CPU demo on synthetic data) or "tiny" (tests)."""
    variant = arg or ""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/bsmamba2.py; choose one of "
                         f"{sorted(VARIANTS)} ('' is the paper config)")
    config = _paper()
    if VARIANTS[variant] is not None:
        VARIANTS[variant](config)
    return config
