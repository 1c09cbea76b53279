r"""MIMIC-III (MultiBench's im.pk, i2m2_jax/datasets/mimic.py) with the paper's recipes.

The task is the config argument: `configs/mimic.py:mortality` (the default),
`configs/mimic.py:icd9_140_239` or `configs/mimic.py:icd9_460_519`, optionally with a stage and
'smoke', comma-separated (e.g. `configs/mimic.py:icd9_140_239,inter,smoke`). Every model of the
table for 3 seeds, then DIR/table.md and DIR/table.csv:

  python experiments/reproduce.py --config configs/mimic.py:mortality --workdir runs/mimic_mort \
      --seeds 3 --config.data.manual_dir=/path/to/folder_with_im.pk
  python experiments/reproduce.py --config configs/mimic.py:icd9_140_239 \
      --workdir runs/mimic_icd9_140_239 --seeds 3 --config.data.manual_dir=/path/to/folder

One model on its own:

  python -m i2m2_jax.main --config configs/mimic.py:icd9_460_519,i2m2 --workdir runs/m/i2m2 \
      --config.data.manual_dir=/path/to/folder
  python experiments/reproduce.py --config configs/mimic.py:icd9_140_239,smoke --workdir /tmp/m \
      --seeds 1 --config.data.manual_dir=...   # a few steps per stage (a plumbing check)

Recipe (the official divyam3897/I2M2: avmnist_and_mimic/mimic_main.py; what reproduce.py runs
and tabulates is in experiments/recipes/mimic.py): every model from scratch (no staging);
RMSprop with PyTorch's defaults (alpha 0.99, eps 1e-8 outside the square root), lr 1e-3, no
weight decay, gradient clipping at global norm 8, constant learning rate, batch 40, 20 epochs,
evaluation once per epoch; the checkpoint is selected by validation accuracy (mortality) or
validation AUPRC (ICD-9 tasks, average precision of P(class 1)); early stopping after 11
evaluations without a strict gain (the reference's `patience > 10`), except for the uni-modal
models, which never stop early.

Models (STAGE_HPARAMS below; C = 6 for mortality, 2 for the ICD-9 tasks):

  stage           experts
  uni_static      MLP(5,10,10) -> MLP(10,40,C)
  uni_timeseries  GRUWithLinear(12,30,15) over 24 h, flattened 360 -> MLP(360,40,C)
  intra           PoE(uni_static, uni_timeseries)
  inter           MLP(5,10,10) || GRU(12,30) all 24 states (720) -> MLP(730,40,C)
  i2m2            PoE(uni_static, uni_timeseries, inter)

Data: z-scores with training-split statistics (set --config.data.normalize_with_all_splits=True
for the reference's all-splits statistics, datasets/mimic/get_data.py); the reference's seeded
80/10/10 split. No BatchNorm in these models. Seeds seed parameters and data order (mimic_main.py's
seed only names the checkpoint folder; README: Where we differ from the official code).

Evaluation "once per epoch" is every floor(num_train / 40) steps (724 on the full data; batches
straddle epochs), plus one at the last step.

Expected wall time per epoch (725 train steps of batch 40 on the 28,970 training patients + one
pass over the 3,621 validation patients, if MultiBench's file has 36,212), measured with
`python experiments/time_per_epoch.py --config configs/mimic.py:mortality` on random data of the
real shapes: 40 train steps after 3 compiling ones, fastest window of 10 steps, extrapolated.
  GPU: not measured (no GPU in this session).
  2-core CPU (Intel Xeon VM, JAX 0.10 CPU backend, 1 device), shared with other jobs (load
  average 4.8-6.2): uni_static 2.5 ms/step, 2 s/epoch; uni_timeseries 3.9 ms, 3 s; intra 4.5 ms,
  3 s; inter 2.9 ms, 2 s; i2m2 8.5 ms, 6 s (ICD-9 i2m2 the same); a 20-epoch run takes 1-2 min,
  the whole table (5 models x 3 seeds) well under an hour.

Published (Madaan et al., NeurIPS 2024, arXiv 2405.17613, as extracted by a third party and not
verified): I2M2 test accuracy 78.1% on mortality and 91.58% on ICD-9 140-239; none extracted for
ICD-9 460-519 (experiments/recipes/mimic.py).
"""
import ml_collections

from configs import default

TASKS = ("mortality", "icd9_140_239", "icd9_460_519")
DEFAULT_STAGE = "i2m2"
# stage -> (model kind, uni-modal modality, early-stopping patience)
STAGE_HPARAMS = {
    "uni_static": ("uni", "static", -1),
    "uni_timeseries": ("uni", "timeseries", -1),
    "intra": ("intra", "", 11),
    "inter": ("inter", "", 11),
    "i2m2": ("i2m2", "", 11),
}


def get_config(arg=None):
  """`arg`: comma-separated tokens: at most one task (default 'mortality'), at most one stage
  (default 'i2m2') and optionally 'smoke'."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  tasks = [t for t in tokens if t in TASKS]
  stage_tokens = [t for t in tokens if t in STAGE_HPARAMS]
  unknown = [t for t in tokens if t not in TASKS and t not in STAGE_HPARAMS and t != "smoke"]
  if unknown or len(tasks) > 1 or len(stage_tokens) > 1:
    raise ValueError(f"configs/mimic.py: bad argument {arg!r}; expected at most one task of "
                     f"{list(TASKS)}, at most one stage of {list(STAGE_HPARAMS)} and optionally "
                     f"'smoke', comma-separated.")
  task = tasks[0] if tasks else "mortality"
  stage = stage_tokens[0] if stage_tokens else DEFAULT_STAGE
  kind, modality, patience = STAGE_HPARAMS[stage]

  config = default.get_config()
  config.stage = stage
  config.data.name = "mimic"
  config.data.task = task
  config.data.standardize = False   # the builder stores z-scored features already
  config.data.normalize_with_all_splits = False

  config.batch_size = 40
  config.eval_batch_size = 400
  config.num_epochs = 20.0
  config.eval_every_steps = -1      # once per epoch
  config.log_every_steps = 145
  config.selection_metric = "accuracy" if task == "mortality" else "auprc"
  config.early_stopping_patience = patience

  config.optimizer.name = "rmsprop"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 8.0
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0

  config.model.kind = kind
  config.model.modality = modality
  config.model.fusion = "late_fusion"
  config.model.encoders = "static=mlp_raw,timeseries=gru_linear"
  config.model.encoder_kwargs = ml_collections.ConfigDict({
      "static": {"features": (10, 10)},
      "timeseries": {"hidden": 30, "per_step_features": 15}})
  config.model.joint_encoder_kwargs = ml_collections.ConfigDict({
      "timeseries": {"hidden": 30, "per_step_features": 0}})
  config.model.head_hidden = (40,)
  config.model.dropout_rate = 0.0
  config.model.init_from = ""

  if "smoke" in tokens:
    # A few steps per stage with the real models (seconds on CPU).
    default.shrink_for_smoke(config, steps=4, batch_size=8, eval_batch_size=16, eval_every=2,
                             log_every=2, head_hidden=None)
  return config
