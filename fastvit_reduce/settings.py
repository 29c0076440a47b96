"""Every configuration key of the trainer and the writer: fastargs Sections, declared once, torch-free.

A run's configuration is the flat dict ``config.resolved(SECTIONS)`` returns
(``{"training.epochs": 300, ...}``); modules take that dict (``*_from_cfg(cfg)``), so this file is
the one list of what can be set, with its default, range and meaning. ``--help`` of
``train.py`` prints it. docs/training.md explains the keys in context.

Importing this module declares the Sections with fastargs (a process-wide registry) and imports
neither torch nor ffcv, so ``sweep``, ``report`` and ``--dry-run`` parse configs without them.
"""
from __future__ import annotations

from fastargs import Param, Section

from fastvit_reduce.augment.spec import parse_spec
from fastvit_reduce.config import Bool01, Checker, Choice, FloatList, Number

# ----------------------------------------------------------------------------- strategy knobs
ROUND_TO = ("round hidden widths to a multiple of this (1 = exact, 8 = tensor-core friendly)")
# strategy -> knob -> (default, checker, meaning); fastvit_reduce/strategies/<name>.py applies them
STRATEGY_KNOBS: dict[str, dict[str, tuple]] = {
    "thin": {
        "mlp_ratio": (2.0, Number(float, 0, lo_open=True), "MLP hidden width / embed dim (timm's ViTs use 4.0)"),
        "round_to": (1, Number(int, 1), ROUND_TO),
    },
    "shallow": {
        "keep_ratio": (0.5, Number(float, 0, 1, lo_open=True), "fraction of MLP hidden units to keep"),
        "prune_by": ("first", Choice("first", "magnitude"), "which hidden units to keep"),
        "round_to": (1, Number(int, 1), ROUND_TO),
    },
    "grouped": {
        "scale": (0.707, Number(float, 0, lo_open=True),
                  "multiplier on the shared MLP's fc1.weight, fc1.bias, fc2.weight"),
        "group_size": (2, Number(int, 2), "consecutive blocks sharing one MLP (<= depth)"),
    },
}
KNOB_OWNERS = {k: [s for s, knobs in STRATEGY_KNOBS.items() if k in knobs]
               for knobs in STRATEGY_KNOBS.values() for k in knobs}  # knob -> strategies taking it
STRATEGY_CHOICES = ("baseline", *STRATEGY_KNOBS)


class RandAugmentSpec(Checker):
    """A timm RandAugment spec string (checked by parsing it), or '' for off."""

    def check(self, value):
        value = "" if value is None else str(value).strip()
        if value:
            parse_spec(value)  # raises ValueError naming the bad section
        return value

    def help(self):
        return "a timm RandAugment spec like rand-m9-mstd0.5-inc1, or '' for off"


# ----------------------------------------------------------------------------- the trainer
Section("data", "FFCV datasets and loading").params(
    train_dataset=Param(str, "train .beton path", default=""),
    val_dataset=Param(str, "validation .beton path", default=""),
    num_workers=Param(Number(int, 0), "ffcv decode threads per process (0 = the cores this "
                      "process may use: its CPU affinity / processes on the node)", default=0),
    in_memory=Param(Bool01(), "1: OS page cache (dataset fits in RAM); 0: ffcv process cache",
                    default=1),
    batches_ahead=Param(Number(int, 1), "batches prepared in advance", default=3),
    drop_last=Param(Bool01(), "drop the last partial train batch", default=1),
    order=Param(Choice("random", "quasi_random"),
                "train order when augment.aug_repeats=1; quasi_random is single-process only "
                "(falls back to random, with a warning, when distributed)", default="random"),
    crop_pct=Param(Number(float, 0, 1), "val center-crop fraction of the short side "
                   "(0 = the model's default)", default=0.0),
    rrc_scale=Param(FloatList(2), "RandomResizedCrop area range", default=[0.08, 1.0]),
    rrc_ratio=Param(FloatList(2), "RandomResizedCrop aspect-ratio range",
                    default=[0.75, 1.3333333]),
    hflip=Param(Bool01(), "random horizontal flip", default=1),
    max_decode_errors=Param(Number(int, 0), "JPEGs that may fail to decode per epoch (train + val, all "
                            "processes; each is used as a black image, counted in log.jsonl and final.json); "
                            "more stop the run with an error (exit 1)", default=10),
)
Section("resolution", "progressive resizing of train images (as in ffcv-imagenet)").params(
    min_res=Param(Number(int, 1), "train resolution up to start_ramp, px", default=224),
    max_res=Param(Number(int, 1), "train resolution from end_ramp on, px", default=224),
    start_ramp=Param(Number(int, 0), "epoch the ramp starts", default=0),
    end_ramp=Param(Number(int, 0), "epoch the ramp ends", default=0),
    step=Param(Number(int, 1), "ramp resolutions are rounded to a multiple of this, px "
               "(use the patch size)", default=16),
)
Section("augment", "on-device batch augmentation (defaults: the DeiT recipe)").params(
    randaugment=Param(RandAugmentSpec(), "timm RandAugment spec; '' = off",
                      default="rand-m9-mstd0.5-inc1"),
    mixup=Param(Number(float, 0), "mixup Beta(alpha, alpha); 0 = off", default=0.8),
    cutmix=Param(Number(float, 0), "cutmix Beta(alpha, alpha); 0 = off", default=1.0),
    mixup_prob=Param(Number(float, 0, 1), "probability of mixing a batch/pair/element",
                     default=1.0),
    mixup_switch_prob=Param(Number(float, 0, 1), "probability of cutmix instead of mixup when "
                            "both are on", default=0.5),
    mixup_mode=Param(Choice("batch", "pair", "elem"), "one lambda per batch, pair or element",
                     default="batch"),
    reprob=Param(Number(float, 0, 1), "random erasing probability per image; 0 = off",
                 default=0.25),
    remode=Param(Choice("pixel", "rand", "const"), "random erasing fill: per-pixel noise, "
                 "per-box colour, or zeros", default="pixel"),
    recount=Param(Number(int, 1), "max erased boxes per image", default=1),
    erase_order=Param(Choice("after_mix", "before_mix"), "random erasing on the mixed batch (timm "
                      "train.py's default prefetcher path, the seed's command) or per image before "
                      "mixup/cutmix (timm's --no-prefetcher)", default="after_mix"),
    aug_repeats=Param(Number(int, 1), "repeated augmentation: copies of each image per epoch "
                      "(read by the train loader's order); 1 = off", default=3),
)
Section("model", "the timm ViT to build").params(
    arch=Param(str, "timm model name (also the seed's vit_base_patch16_224_dgmlp)",
               default="vit_base_patch16_224"),
    num_classes=Param(Number(int, 1), "classifier outputs", default=1000),
    img_size=Param(Number(int, 1), "model input size in px (sets the position embedding)", default=224),
    patch_size=Param(Number(int, 0), "patch size in px (0 = the arch's)", default=0),
    drop_path=Param(Number(float, 0, 1, hi_open=True), "stochastic depth rate", default=0.1),
    pretrained_file=Param(str, "local state dict (ours or timm's) loaded into the full model before the "
                          "surgery ('' = none; thin: must already have the thin widths)", default=""),
)
_KNOB_PARAMS = {}
for _strategy, _knobs in STRATEGY_KNOBS.items():
    for _name, (_default, _checker, _meaning) in _knobs.items():
        _KNOB_PARAMS.setdefault(_name, Param(_checker, f"{_meaning} ({'/'.join(KNOB_OWNERS[_name])})",
                                             default=_default))
Section("reduction", "MLP reduction strategy and its knobs (see fastvit_reduce/strategies)").params(
    strategy=Param(Choice(*STRATEGY_CHOICES), "MLP reduction strategy", default="baseline"),
    **_KNOB_PARAMS,
)
Section("training", "the training loop").params(
    epochs=Param(Number(int, 1), "number of epochs", default=300),
    batch_size=Param(Number(int, 1), "images per process (per GPU) per micro-batch", default=256),
    global_batch=Param(Number(int, 0), "images per optimizer update over all processes; gradient "
                       "accumulation makes up the rest (0 = batch_size x processes)", default=0),
    amp=Param(Choice("off", "fp16", "bf16"), "autocast dtype (fp16 uses a GradScaler)", default="off"),
    channels_last=Param(Bool01(), "NHWC images and conv weights", default=1),
    compile=Param(Bool01(), "torch.compile each variant's model", default=0),
    label_smoothing=Param(Number(float, 0, 1, hi_open=True), "label smoothing (folded into "
                          "mixup's soft targets when mixup/cutmix is on)", default=0.1),
    clip_grad=Param(Number(float, 0), "max gradient norm (0 = no clipping)", default=0.0),
    seed=Param(Number(int, 0), "seed of model init, data order, crops and augmentation", default=42),
    device=Param(Choice("auto", "cpu", "cuda"), "auto = cuda when available", default="auto"),
    max_nonfinite=Param(Number(int, 1), "stop a variant after this many consecutive updates with a "
                        "non-finite loss", default=5),
    threads=Param(Number(int, 0), "torch intra-op threads (0 = the cores this process may use)",
                  default=0),
    deterministic=Param(Bool01(), "torch deterministic algorithms (bit-exact CUDA kernels, slower)",
                        default=0),
    overlap=Param(Choice("ahead", "decode", "none"),
                  "how preparing batches meets the model step (the result is the same in every mode): "
                  "ahead = decode (ffcv's thread) and augment (a thread) batch i+1 while step i computes; "
                  "decode = only decoding beside the step; none = decoding and augmentation take turns "
                  "with the step, each with all this process's cores (.beton data only)", default="ahead"),
)
Section("optim", "AdamW (torch; fused kernel when the device supports it)").params(
    lr=Param(Number(float, 0, lo_open=True), "peak learning rate (before lr.scale)", default=1e-3),
    weight_decay=Param(Number(float, 0), "decoupled weight decay (not on 1-D params, pos_embed, "
                       "cls_token)", default=0.05),
    betas=Param(FloatList(2), "AdamW betas", default=[0.9, 0.999]),
    eps=Param(Number(float, 0, lo_open=True), "AdamW eps", default=1e-8),
    fused=Param(Bool01(), "use torch's fused AdamW (falls back to foreach if unsupported)", default=1),
)
Section("lr", "timm's schedule (create_scheduler_v2 as train.py drives it): warm-up, then cosine").params(
    schedule=Param(Choice("cosine", "constant"), "shape after warm-up (timm --sched)", default="cosine"),
    step_on=Param(Choice("epoch", "update"), "epoch: one lr per epoch, stepped after each epoch (timm "
                  "train.py's default); update: stepped after every update (its --sched-on-updates)",
                  default="epoch"),
    warmup_epochs=Param(Number(float, 0), "epochs of linear warm-up from warmup_lr (--warmup-epochs)", default=5.0),
    warmup_lr=Param(Number(float, 0), "lr at the start of the warm-up (--warmup-lr)", default=1e-5),
    min_lr=Param(Number(float, 0), "lr at the end of the cosine (--min-lr)", default=0.0),
    warmup_prefix=Param(Bool01(), "1: the warm-up comes before the cosine instead of inside it "
                        "(--warmup-prefix)", default=0),
    cooldown_epochs=Param(Number(int, 0), "last epochs at min_lr after the cosine (--cooldown-epochs; "
                          "training.epochs counts them)", default=0),
    cycle_mul=Param(Number(float, 0, lo_open=True), "cosine cycle length multiplier (--lr-cycle-mul)", default=1.0),
    cycle_decay=Param(Number(float, 0), "peak lr factor per cosine cycle (--lr-cycle-decay)", default=0.5),
    cycle_limit=Param(Number(int, 1), "cosine cycles (--lr-cycle-limit)", default=1),
    k_decay=Param(Number(float, 0, lo_open=True), "k-decay exponent of the cosine (--lr-k-decay)", default=1.0),
    scale=Param(Choice("none", "linear", "sqrt"), "peak = optim.lr x (global batch / base_batch) "
                "(linear, DeiT's rule) or its square root; none = optim.lr as given", default="none"),
    base_batch=Param(Number(int, 1), "global batch at which optim.lr applies (lr.scale != none)",
                     default=512),
)
Section("ema", "exponential moving average of the weights (sharing-safe)").params(
    decay=Param(Number(float, 0, 1, hi_open=True), "EMA decay per EMA update (0 = no EMA)", default=0.0),
    every=Param(Number(int, 1), "optimizer updates between EMA updates", default=1),
    eval=Param(Bool01(), "evaluate the EMA model; its top-1 is then the headline, as in timm", default=1),
    shared_tensors=Param(Choice("once", "per_name"), "once: a tensor shared by blocks (grouped) moves once "
                         "per update; per_name: once per state_dict name, i.e. decay**2 for shared tensors "
                         "(timm's ModelEmaV3, the seed's behaviour)", default="once"),
)
Section("validation", "top-1/top-5 on data.val_dataset").params(
    batch_size=Param(Number(int, 1), "images per process", default=256),
    every_n_epochs=Param(Number(int, 1), "evaluate every N epochs (and always after the last)", default=1),
    resolution=Param(Number(int, 0), "val resolution in px (0 = model.img_size)", default=0),
)
Section("logging", "where results go").params(
    folder=Param(str, "parent folder of run folders", default="runs"),
    experiment=Param(str, "run folder name ('' = the config file's name, else reduction.strategy)",
                     default=""),
    progress=Param(Bool01(), "tqdm progress bars on rank 0", default=1),
    every_steps=Param(Number(int, 1), "optimizer updates between host reads of the loss and the "
                      "ranks' stop/save agreement", default=20),
)
Section("checkpoint", "last.pt / best.pt").params(
    every_minutes=Param(Number(float, 0), "also write last.pt every N minutes mid-epoch (0 = only "
                        "at epoch ends)", default=0.0),
    save_best=Param(Bool01(), "write best.pt on a new best headline top-1", default=1),
    on_damaged=Param(Choice("refuse", "fresh", "best"), "a last.pt that cannot be read: refuse "
                     "(exit 2), or move it aside and start fresh / from best.pt", default="refuse"),
)
# the trainer's sections, in the order --help and params.json list them
SECTIONS = ["data", "resolution", "augment", "model", "reduction", "training", "optim", "lr", "ema",
            "validation", "logging", "checkpoint"]
# what a paired variant may set for itself; every other key shapes the shared batches
PER_VARIANT = ("model.", "reduction.", "ema.", "optim.", "lr.", "logging.experiment")
SHARED_MODEL_KEYS = ("model.num_classes", "model.img_size")  # the batches' labels and pixels

# ----------------------------------------------------------------------------- the writer
Section("cfg", "writing an ImageFolder split to a .beton (fastvit-reduce write)").params(
    data_dir=Param(str, "folder holding train/ and val/, each with one sub-folder per class", default=""),
    split=Param(Choice("train", "val"), "which sub-folder of data_dir to write", default="train"),
    write_path=Param(str, "output .beton file (its folder must exist)", default=""),
    max_resolution=Param(Number(int, 1, 4096), "long side of the stored images, px "
                         "(larger images are shrunk while decoding)", default=256),
    write_mode=Param(Choice("jpg", "raw", "proportion", "smart"), "jpg: all JPEG; raw: all "
                     "uint8 pixels; proportion: JPEG with probability compress_probability; smart: "
                     "JPEG only when the raw pixels exceed smart_threshold bytes", default="proportion"),
    compress_probability=Param(Number(float, 0, 1), "share of images stored as JPEG "
                               "(write_mode=proportion)", default=0.5),
    smart_threshold=Param(Number(int, 0), "bytes of raw pixels above which write_mode=smart "
                          "stores JPEG (150528 = a 224x224 RGB image)", default=224 * 224 * 3),
    jpeg_quality=Param(Number(int, 1, 100), "JPEG quality of stored images", default=90),
    max_aspect=Param(Number(float, 0), "skip (and list in the report) an image whose long side is more "
                     "than this many times its short side (0 = keep all)", default=20.0),
    num_workers=Param(Number(int, 0), "writer processes (0 = one per CPU core)", default=0),
    chunk_size=Param(Number(int, 1), "images a worker takes at a time", default=100),
    subset=Param(Number(int, -1), "first N images of each class (-1 or 0 = all)", default=-1),
    on_error=Param(Choice("skip", "raise"), "undecodable file: skip it and list it in the report, "
                   "or stop the write", default="skip"),
)
WRITE_SECTIONS = ["cfg"]
