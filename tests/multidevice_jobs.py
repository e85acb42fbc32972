"""The learning modes on tiny settings, for ``test_parallel.py``: run in a subprocess with 8 host devices, or as one of
several processes of a ``jax.distributed`` run; prints ``RESULT{json}`` with every row's metrics and loss curves.

    python tests/multidevice_jobs.py devices WORKDIR
        compare (base, LD3, INDIS, MTEO) and pd (two rounds), first on a mesh of every device, then on a mesh of
        the first device only (same process, the references solved once): {"many": ..., "one": ...}
    python tests/multidevice_jobs.py processes WORKDIR COORDINATOR NUM_PROCESSES PROCESS_ID [SEED_WORKDIR]
        compare (base, MTEO) with --config.distributed=True and that cluster; SEED_WORKDIR's reference cache is copied
        in first (content-keyed, so only the solve is saved): {"compare": ...}

The pictures are not drawn (they are tested elsewhere; here they would cost a third of the time).
"""

import json
import shutil
import sys
from pathlib import Path

from mteo_jax import comparison, harness, modes, parallel

ROW_KEYS = ("method", "solver", "nfe", "rmse", "psnr", "nll", "sw", "loss_curve")


def compare_config(methods=("base", "ld3", "indis", "mteo")):
  """The methods on the GMM teacher, iPNDM at NFE 3; every batch a multiple of 8."""
  config = modes.base_config("compare")
  config.compare.update({"teacher": "pretrained:gmm", "methods": methods, "solvers": ("ipndm",), "nfes": (3,),
                         "num_train": 64, "num_eval": 64, "eval_batch_size": 32, "teacher_steps": 3, "grid_size": 8,
                         "progress": False, "num_select": 32})
  config.compare.reference.update({"rtol": 1e-4, "atol": 1e-4})
  config.mteo.update({"steps": 6, "batch_size": 16, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 6,
                      "eval_every": 0, "progress": False, "save_tables": False})
  if "ld3" in methods:
    config.ld3.update({"steps": 6, "num_train": 40, "batch_size": 8, "eval_every": 6, "log_every": 2,
                       "checkpoint_every": 6, "progress": False})
  if "indis" in methods:
    config.indis.update({"steps": 6, "batch_size": 16, "hidden": 16, "warmup_steps": 2, "log_every": 2,
                         "checkpoint_every": 6, "progress": False})
  return config


def pd_config():
  """One PD round (2 -> 1 DDIM steps) on the GMM teacher."""
  config = modes.base_config("pd")
  config.compare.update({"teacher": "pretrained:gmm", "nfes": (1,), "num_eval": 64, "eval_batch_size": 32,
                         "teacher_steps": 3, "grid_size": 8, "progress": False})
  config.compare.reference.update({"rtol": 1e-4, "atol": 1e-4})
  config.pd.update({"start_steps": 2, "end_steps": 1, "steps": 6, "batch_size": 16, "log_every": 2,
                    "checkpoint_every": 6, "progress": False, "export_students": False})
  return config


def rows(results):
  return [{k: row.get(k) for k in ROW_KEYS} for row in results["rows"]]


def seed_references(source, workdir):
  if (Path(source) / "references").is_dir() and not (Path(workdir) / "references").exists():
    shutil.copytree(Path(source) / "references", Path(workdir) / "references")


def refusals(workdir):
  """Each mode's config with a training batch of 12, which 8 devices cannot split: the messages, and whether the
  workdir was touched."""
  from configs import gmm  # noqa: PLC0415  (the repository's config tree)
  by_mode = {"train": gmm.get_config("tiny"), "mteo": modes.base_config("mteo"), "compare": compare_config(),
             "pd": pd_config()}
  by_mode["train"].train.batch_size = 12
  by_mode["mteo"].mteo.update({"teacher": "pretrained:gmm", "batch_size": 12})
  by_mode["compare"].mteo.batch_size = 12
  by_mode["pd"].pd.batch_size = 12
  out = {}
  for mode, config in by_mode.items():
    try:
      modes.run(config, f"{workdir}/refused_{mode}")
      out[mode] = None
    except modes.ConfigError as error:
      out[mode] = [str(error), Path(f"{workdir}/refused_{mode}").exists()]
  return out


def on_devices(workdir):
  import jax  # noqa: PLC0415
  out = {"devices": jax.device_count(), "refusals": refusals(workdir)}
  make_mesh = parallel.make_mesh
  for name in ("many", "one"):
    if name == "one":   # every mesh the library makes: the first device only
      parallel.make_mesh = lambda devices=None: make_mesh(jax.devices()[:1] if devices is None else devices)
      parallel.local_mesh = lambda: make_mesh(jax.devices()[:1])
    out[name] = {}
    for mode, config in (("compare", compare_config()), ("pd", pd_config())):
      seed_references(f"{workdir}/many/compare", f"{workdir}/{name}/{mode}")
      out[name][mode] = rows(modes.run(config, f"{workdir}/{name}/{mode}"))
  return out


def on_processes(workdir, coordinator, num_processes, process_id, seed=None):
  config = compare_config(methods=("base", "mteo"))
  config.distributed = "true"
  config.cluster.update({"coordinator_address": coordinator, "num_processes": int(num_processes),
                         "process_id": int(process_id)})
  if seed and int(process_id) == 0:
    seed_references(seed, workdir)
  results = modes.run(config, workdir)
  import jax  # noqa: PLC0415  (distributed is initialised by modes.run, before any other JAX call)
  return {"compare": rows(results), "devices": jax.device_count(), "processes": jax.process_count(),
          "process_index": jax.process_index()}


if __name__ == "__main__":
  harness.draw_pictures = lambda *args, **kwargs: {}
  comparison.save_schedule_picture = lambda *args, **kwargs: None
  what, args = sys.argv[1], sys.argv[2:]
  out = on_devices(*args) if what == "devices" else on_processes(*args)
  print("RESULT" + json.dumps(out))
