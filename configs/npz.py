"""Your own multi-modal data from .npz files (i2m2_jax/datasets/npz.py).

`--config.data.path=DIR` names a folder with train.npz and test.npz (optionally val.npz; otherwise
`val_fraction` of train is held out, stratified, seeded by `split_seed`). Each file holds `label`
(integers 0..C-1, shape [N]; or [N, L] binary labels; or float `scores` [N, C]) and one array
per modality under any other key: vectors [N, D], sequences [N, T, F], images [N, H, W, C];
float32 or uint8. Encoders by shape (i2m2_jax.models.default_encoder): flattened into each
expert's MLP head up to 1,024 numbers per example, else conv1d (sequences) or cnn (images);
others from the command line: `--config.model.encoders=seq=gru,img=cnn` (arguments per modality
in a config file, `config.model.encoder_kwargs.<modality>`).

Each model is trained to its best on validation: up to 200 epochs (2,000..30,000 steps) at a
constant learning rate, early stopping after 10 evaluations without a gain, an L2 penalty scaled
to the training-set size. I2M2 (the default kind) is trained in stages, as the paper does: each
uni-modal expert and the joint model alone in WORKDIR/experts/, then I2M2 fine-tuned from their
best checkpoints (`--config.model.i2m2_init=scratch` trains it alone from random weights).
experiments/defaults_study.py measured these defaults on fourteen data sets against
scikit-learn references (README "Your own data"); experiments/tune.py searches around them.

  python -m i2m2_jax.main --config configs/npz.py --workdir runs/mydata_i2m2 \\
      --config.data.path=/path/to/folder
  python -m i2m2_jax.main --config configs/npz.py --workdir runs/mydata_inter \\
      --config.data.path=/path/to/folder --config.model.kind=inter
  python -m i2m2_jax.main --config configs/npz.py:smoke --workdir /tmp/smoke \\
      --config.data.path=/path/to/folder  # seconds

Expected result: depends on your data; the test suite runs this whole path (build, validation,
training, results.json) on small files of every rank.
"""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "npz"
  config.data.path = ""           # folder holding train.npz, test.npz [, val.npz]
  config.data.val_fraction = 0.1  # held out of train.npz when there is no val.npz
  config.data.split_seed = 0
  config.data.num_classes = -1    # <= 0: max(train label) + 1
  config.data.label_names = ""    # multilabel: names of the L labels, 'a,b,c'

  # Trained to its best on validation: a long budget cut short by early stopping (10
  # evaluations without a gain; the best checkpoint is tested), evaluated once per epoch but at
  # most every 50 steps, at a constant learning rate. Adam with an L2 penalty 0.01 on the
  # gradient (coupled, as scikit-learn's MLP and torch.optim.Adam(weight_decay=...) do) up to
  # 10,000 training examples, scaled by 10,000 / the training examples above (0.0025 for 40,000).
  # The study (README "Your own data") measured it against AdamW's decoupled decay 1.0: up to
  # +3.3 points where many inputs carry little evidence (flattened images and sequences, weak
  # vectors), 0.6 to 1.2 points lower on scikit-learn's digits.
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 200.0
  config.min_train_steps = 2000
  config.max_train_steps = 30000
  config.min_steps_between_evals = 50
  config.early_stopping_patience = 10
  config.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"
  config.optimizer.weight_decay = 0.01
  config.optimizer.weight_decay_examples = 10000
  # I2M2 fine-tuned from its experts trained alone (WORKDIR/experts/): from scratch the
  # uni-modal experts over-fit inside the product on some of the study's sets.
  config.model.i2m2_init = "experts"

  if arg == "smoke":
    default.shrink_for_smoke(config)
  return config
