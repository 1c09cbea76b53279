"""The scripts under experiments/ import side by side, as the tests that use their functions need."""
import os

from helpers import EXPERIMENTS, import_experiment


def test_every_experiment_script_imports_beside_the_others():
  # Scripts are absl programs whose flags share names (--config, --out); import_experiment drops
  # a script's flags once it is imported, so one process can hold them all.
  names = sorted(f[:-3] for f in os.listdir(EXPERIMENTS) if f.endswith(".py"))
  modules = {name: import_experiment(name) for name in names}
  scripts = [name for name, module in modules.items() if hasattr(module, "main")]
  assert {"benchmark", "compare", "digits_as_avmnist", "extract_features", "reproduce"} <= set(
      scripts), scripts
