r"""AV-MNIST-format files made from scikit-learn's digits: the AV-MNIST models on learnable data
with no download (for checks such as experiments/precision.py, not for the paper's numbers).

  python experiments/digits_as_avmnist.py --out /tmp/digits_av [--train 6000 --val 1000 --test 1000]
  python -m i2m2_jax.main --config configs/avmnist.py:inter_lf --workdir runs/dav \
      --config.data.manual_dir=/tmp/digits_av --config.data.num_val=1000

Writes the MultiBench layout that i2m2_jax/datasets/avmnist.py reads: image/{train,test}_data.npy
(uint8 [N, 784]), audio/{train,test}_data.npy (uint8 [N, 112, 112]) and {train,test}_labels.npy.
Each example draws one 8x8 digit; the digits are split in three, so that the validation rows (the
last --val training rows: pass the same number as --config.data.num_val) and the test rows come
from digits no training row uses:
the image is the digit enlarged 3x at a random offset in 28x28 plus noise, the 'audio' the same
digit enlarged 14x to 112x112 under heavier noise, so each modality alone carries the label.
"""
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from i2m2_jax.datasets import avmnist  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Folder to write the files into.")
_TRAIN = flags.DEFINE_integer("train", 6000, "Rows of the train files, validation included.")
_VAL = flags.DEFINE_integer("val", 1000, "The last rows of the train files: validation.")
_TEST = flags.DEFINE_integer("test", 1000, "Test rows.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
flags.mark_flags_as_required(["out"])


def make_split(digits: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
  """(image [n, 784], audio [n, 112, 112], label [n]) from random rows of `digits` (0..16)."""
  pick = rng.integers(0, len(digits), n)
  base = digits[pick] / 16.0  # [n, 8, 8] in [0, 1]
  image = np.zeros((n, 28, 28), np.float32)
  big = np.kron(base, np.ones((3, 3)))  # 24 x 24
  offsets = rng.integers(0, 5, (n, 2))
  for i, (dy, dx) in enumerate(offsets):
    image[i, dy:dy + 24, dx:dx + 24] = big[i]
  image = 255 * image + rng.normal(0, 60, image.shape)
  audio = 255 * np.kron(base, np.ones((14, 14))) + rng.normal(0, 160, (n, 112, 112))
  as_uint8 = lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8)  # noqa: E731
  return as_uint8(image).reshape(n, 784), as_uint8(audio), labels[pick].astype(np.int64)


def write(out: str, train: int, val: int, test: int, seed: int = 0) -> None:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images, labels = digits.images, digits.target
  fifth = len(images) // 5  # digits: 3/5 for training rows, 1/5 validation, 1/5 test
  rng = np.random.default_rng(seed)
  parts = {"train": [(train - val, slice(None, -2 * fifth)), (val, slice(-2 * fifth, -fifth))],
           "test": [(test, slice(-fifth, None))]}
  for split, pieces in parts.items():
    made = [make_split(images[rows], labels[rows], n, rng) for n, rows in pieces]
    avmnist.write_split(out, split, *(np.concatenate(columns) for columns in zip(*made)))


def main(argv):
  del argv
  if not 0 < _VAL.value < _TRAIN.value:
    raise app.UsageError(f"--val={_VAL.value} must be between 0 and --train={_TRAIN.value}.")
  write(_OUT.value, _TRAIN.value, _VAL.value, _TEST.value, _SEED.value)
  print(f"Written: {_OUT.value} (train files {_TRAIN.value} rows, the last {_VAL.value} of them "
        f"for validation; test {_TEST.value} rows)")


if __name__ == "__main__":
  app.run(main)
