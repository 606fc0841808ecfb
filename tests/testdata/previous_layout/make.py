# How tests/testdata/previous_layout was made, at commit b647a61 (the flat
# package before the zones layout), from the repository root:
#   .venv/bin/python tests/testdata/previous_layout/make.py
# Kept to show what the files are; it does not run against the new layout
# unchanged (it is the old layout's API) and the test never runs it.
import os, sys, json, shutil
sys.path.insert(0, "."); sys.path.insert(0, "tests")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import jax
from conftest import tiny_digits_config
from bnn_jax.datasets import digits
from bnn_jax import phases, export, evaluate
data_dir = "/tmp/legacy_tfds"; digits.prepare(data_dir)
out = "tests/testdata/previous_layout"
shutil.rmtree(out, ignore_errors=True); os.makedirs(out)
cfg = tiny_digits_config(data_dir)
cfg.phase_order = "step2"
cfg.phases.step2.init_from = ""
cfg.phases.step2.teacher = ""
cfg.phases.step2.model.width_multiplier = 0.125
cfg.phases.step2.num_epochs = 1
cfg.checkpoint_every_steps = 100
cfg.keep_checkpoints = 1
cfg.phases.step2.loss.kd_weight = 0.0
cfg.phases.step2.loss.ce_weight = 1.0
wd = out + "/workdir"
res = phases.run(cfg, wd)
print(res)
r = export.export_packed(cfg, wd, out + "/step2.bnn", phase="step2")
print(r)
ev = evaluate.run_evaluation(cfg, wd, phase="step2")
print(ev)
json.dump({"results": res, "evaluate": ev, "export": r}, open(out + "/expected.json", "w"), indent=1, default=str)
# (then, in the same commit: expected["evaluate_packed"] =
#  packed.run_evaluation(cfg, out + "/step2.bnn"), without the path fields.)
