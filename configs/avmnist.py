r"""AV-MNIST (MultiBench files, i2m2_jax/datasets/avmnist.py) with the paper's staged recipes.

The whole protocol, every stage for 3 seeds, then DIR/table.md and DIR/table.csv:

  python experiments/reproduce.py --config configs/avmnist.py --workdir runs/avmnist --seeds 3 \
      --config.data.manual_dir=/path/to/avmnist   # the folder avmnist.tar.gz unpacked into

One stage on its own (`get_config('<stage>[,smoke]')`, i.e. `configs/avmnist.py:<stage>`):

  python -m i2m2_jax.main --config configs/avmnist.py:uni_image --workdir runs/av/uni_image \
      --config.data.manual_dir=/path/to/avmnist
  python -m i2m2_jax.main --config configs/avmnist.py:i2m2 --workdir runs/av/i2m2 \
      --config.data.manual_dir=/path/to/avmnist \
      --config.model.init_from=uni_image=runs/av/uni_image,uni_audio=runs/av/uni_audio,joint=runs/av/inter_lf
  python experiments/reproduce.py --config configs/avmnist.py:smoke --workdir /tmp/av_smoke \
      --seeds 1 --config.data.manual_dir=...   # a few steps per stage (a plumbing check)

Stages (hyper-parameters in STAGE_HPARAMS below; which stage initialises which in
experiments/recipes/avmnist.py), as in the official divyam3897/I2M2:
avmnist_and_mimic/avmnist_main.py. All: batch 40, 30 epochs (1375 steps of the 55,000 training
rows each), SGD without momentum, weight decay 1e-4 (L2 added after clipping), gradient clipping
at global norm 8, constant learning rate, evaluation on the 5,000 validation rows once per epoch,
checkpoint selected by validation accuracy.

  stage       model                                     lr    init from              early stop
  uni_image   LeNet(1,3,3) -> MLP(24,100,10)            0.01  scratch                no
  uni_audio   LeNet(1,3,5) -> MLP(96,100,10)            0.01  scratch                no
  inter_lf    LeNet c=6 both, concat 240 -> MLP         0.1   scratch                11
  inter_lrtf  LeNet c=6 both, LRTF(rank 40, 120) -> MLP 0.1   scratch                11
  intra       PoE(uni_image, uni_audio)                 0.1   uni_image, uni_audio   11
  i2m2        PoE(uni_image, uni_audio, LF joint)       0.01  both unis, inter_lf    11
  i2m2_lrtf   the same with the LRTF joint              0.01  both unis, inter_lrtf  11

reproduce.py runs i2m2 (joint expert from inter_lf) by default; `--fusion=lrtf` runs i2m2_lrtf
instead, `--fusion=both` both. The LRTF size is config.model.fusion_kwargs.{rank,output_dim},
which only the LRTF stages' configs have: override it with an LRTF stage in --config, e.g.
`--config configs/avmnist.py:inter_lrtf --config.model.fusion_kwargs.rank=20` (reproduce.py
ignores the stage token and applies the override to the LRTF stages).

Early stopping: the reference breaks when `patience > 10` (its counter of epochs without a strict
gain in validation accuracy), i.e. after 11 such epochs in a row; here
`early_stopping_patience = 11` evaluations (one per epoch) is the same rule. The uni-modal stages
never stop early.

Defaults and deviations from the official code (README: Where we differ from the official code;
paths in divyam3897/I2M2: avmnist_and_mimic/): BatchNorm runs in eval mode (running averages) at
validation and test for every stage, including the uni-modal ones (the official
training_structures/unimodal.py never calls model.eval()); LRTF factors are trained (in
common_fusions.py they become fixed random projections on GPU); the intra baseline is tested as
a product of experts (training_structures/intra_modality.py tests a mixture); seeds seed
parameters, data order and everything else (avmnist_main.py's seed only names the checkpoint
folder). Inputs: uint8 0..255 divided by 255 on device (standardize=False).

`get_config()` with no argument is the I2M2 fine-tuning stage ('i2m2'): without
config.model.init_from it trains I2M2 from scratch at the fine-tuning learning rate, which is
*not* the paper's recipe; experiments/reproduce.py sets init_from for you.

Expected wall time per epoch (1375 train steps of batch 40 + one pass over the 5,000 validation
rows), measured with `python experiments/time_per_epoch.py --config configs/avmnist.py` on random
uint8 data of the real shapes (40 train steps after 3 compiling ones, fastest window of 10 steps,
extrapolated to an epoch), three runs:
  GPU: not measured (no GPU in this session).
  2-core CPU (Intel Xeon VM, JAX 0.10 CPU backend, 1 device), *shared* with other jobs (load
  average 2.7-5.0 during the runs). Fastest step and eval over the three runs, and the range of
  the three runs' epoch estimates:

    stage        train step   eval / example   epoch (range)       30 epochs
    uni_image       8.5 ms       0.08 ms        12 s  (12-18 s)     6 min
    uni_audio     175 ms         1.2 ms        246 s (246-265 s)    2.1 h
    inter_lf      201 ms         2.3 ms        288 s (288-457 s)    2.4 h
    inter_lrtf    203 ms         1.3 ms        285 s (285-483 s)    2.4 h
    intra         109 ms         1.1 ms        156 s (156-535 s)    1.3 h
    i2m2          271 ms         2.4 ms        385 s (385-1058 s)   3.2 h
    i2m2_lrtf     286 ms         3.5 ms        411 s (411-777 s)    3.4 h

  Contention moved these by up to 2-3x between runs (intra contains uni_audio yet timed faster),
  so on an idle 2-core machine expect the best column or a little better (uni_audio likely
  ~100 ms). The default protocol (six stages, 30 epochs each, no early stop) is then ~11 h per
  seed on such a CPU: run it on a GPU. Early stopping can end the last four stages sooner.

Published (Madaan et al., NeurIPS 2024, arXiv 2405.17613, as extracted by a third party and not
verified; fusion not stated there): I2M2 test accuracy 72.38% (experiments/recipes/avmnist.py).
Reference levels: LeNet image-only ~65%, audio-only ~43% (third party).
"""
import ml_collections

from configs import default

DEFAULT_STAGE = "i2m2"
# stage -> (model kind, uni-modal modality, joint fusion, learning rate, early-stopping patience)
STAGE_HPARAMS = {
    "uni_image": ("uni", "image", "late_fusion", 0.01, -1),
    "uni_audio": ("uni", "audio", "late_fusion", 0.01, -1),
    "inter_lf": ("inter", "", "late_fusion", 0.1, 11),
    "inter_lrtf": ("inter", "", "lrtf", 0.1, 11),
    "intra": ("intra", "", "late_fusion", 0.1, 11),
    "i2m2": ("i2m2", "", "late_fusion", 0.01, 11),
    "i2m2_lrtf": ("i2m2", "", "lrtf", 0.01, 11),
}


def get_config(arg=None):
  """`arg`: comma-separated tokens: at most one stage name (default 'i2m2') and 'smoke'."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  unknown = [t for t in tokens if t not in STAGE_HPARAMS and t != "smoke"]
  stage_tokens = [t for t in tokens if t in STAGE_HPARAMS]
  if unknown or len(stage_tokens) > 1:
    raise ValueError(f"configs/avmnist.py: bad argument {arg!r}; expected at most one stage of "
                     f"{list(STAGE_HPARAMS)} plus optionally 'smoke', comma-separated.")
  stage = stage_tokens[0] if stage_tokens else DEFAULT_STAGE
  kind, modality, fusion, lr, patience = STAGE_HPARAMS[stage]

  config = default.get_config()
  config.stage = stage
  config.data.name = "avmnist"
  config.data.standardize = False   # uint8 0..255 -> x / 255 on device, as the reference
  config.data.num_val = 5000        # the last 5,000 training rows

  config.batch_size = 40
  config.eval_batch_size = 400
  config.num_epochs = 30.0
  config.eval_every_steps = -1      # once per epoch
  config.log_every_steps = 275
  config.selection_metric = "accuracy"
  config.early_stopping_patience = patience

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = lr
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 1e-4
  config.optimizer.grad_clip_norm = 8.0
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0

  config.model.kind = kind
  config.model.modality = modality
  config.model.fusion = fusion
  config.model.fusion_kwargs = ml_collections.ConfigDict(
      {"rank": 40, "output_dim": 120} if fusion == "lrtf" else {})
  config.model.encoders = "image=lenet,audio=lenet"
  config.model.encoder_kwargs = ml_collections.ConfigDict({
      "image": {"channels": 3, "num_blocks": 3}, "audio": {"channels": 3, "num_blocks": 5}})
  config.model.joint_encoder_kwargs = ml_collections.ConfigDict({
      "image": {"channels": 6, "num_blocks": 3}, "audio": {"channels": 6, "num_blocks": 5}})
  config.model.head_hidden = (100,)
  config.model.dropout_rate = 0.0
  config.model.init_from = ""

  if "smoke" in tokens:
    # A few steps per stage with the real models; data settings untouched, so point it at
    # small files (tests pass --config.data.num_val too).
    default.shrink_for_smoke(config, steps=4, batch_size=8, eval_batch_size=16, eval_every=2,
                             log_every=2, head_hidden=None)
  return config
