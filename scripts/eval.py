"""Evaluate a run: task scores vs the base (zero-shot and few-shot) and forgetting; writes WORKDIR/report.json.

  python scripts/eval.py --workdir=DIR                      # the run in DIR (its config.json, best checkpoint)
  python scripts/eval.py --workdir=DIR --step=latest        # or a step number
  python scripts/eval.py --workdir=DIR --metric=person_json --few_shot=5 --max_examples=100
  python scripts/eval.py --workdir=OUT --config=configs/NAME.py --model=MERGED_HF_DIR   # any model vs the
                                                            # config's base model (config.model.path)

Writes WORKDIR/report.json, report.md and progress.png, and prints the before/after table. The base
model's replies to the retain prompts and its task baselines are cached in the workdir, so a second
evaluation only measures the tuned model. Multi-host: the same command on every process with
--coordinator_address/--num_processes/--process_id; process 0 writes.
"""

from absl import app, flags
from ml_collections import config_flags

from ftjax import cli

config_flags.DEFINE_config_file("config", None, "Recipe (default: WORKDIR/config.json of the run).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir (read, and where the report goes).")
flags.DEFINE_string("model", None, "Evaluate this model (HF folder, .gguf, name) instead of the workdir's "
                    "checkpoint, against the config's base model.")
flags.DEFINE_string("step", "best", "Checkpoint to evaluate: best (lowest eval loss, else the latest), latest or a "
                    "step number; the default is the one scripts/export.py and ftjax.load_model(WORKDIR) take.")
flags.DEFINE_string("metric", None, "Override eval.metric (e.g. exact,json_valid or person_json).")
flags.DEFINE_integer("few_shot", None, "Override eval.few_shot (k train examples in the prompted baseline).")
flags.DEFINE_integer("max_examples", None, "Override eval.max_examples.")
flags.DEFINE_string("eval_data", None, "Override data.eval (JSONL of chat or prompt/completion records).")
flags.DEFINE_string("retain", None, "Override forget.retain (retain-set JSONL; empty = bundled).")
flags.DEFINE_enum("report", None, ["full", "quick"], "Override eval.report: the report's size (quick: 20 examples).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

_OVERRIDES = (("metric", "eval.metric"), ("few_shot", "eval.few_shot"), ("max_examples", "eval.max_examples"),
              ("eval_data", "data.eval"), ("retain", "forget.retain"), ("report", "eval.report"))


def _config():
    from ftjax import config as config_lib
    from ftjax.workdir import config_from_workdir

    config = cli.config_from_flags() if FLAGS["config"].present else config_from_workdir(FLAGS.workdir)
    for flag, key in _OVERRIDES:
        value = getattr(FLAGS, flag)
        if value is not None:
            group, name = key.split(".")
            config[group][name] = value
    return config_lib.validate(config)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.init_distributed()
    config = _config()
    from ftjax.api import load_model, load_tokenizer
    from ftjax.evaluation.run import Evaluation
    from ftjax.sharding import mesh_from_config
    from ftjax.workdir import load_trained

    mesh = mesh_from_config(config.mesh)
    kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, mesh=mesh)
    if FLAGS.model:
        model, base, step = load_model(FLAGS.model, **kw), load_model(config.model.path, **kw), 0
    else:
        run = load_trained(FLAGS.workdir, FLAGS.step, mesh=mesh)  # the loader export and load_model use
        model, step = run.model, run.step
        from ftjax.interop.sources import resolve
        from ftjax.methods import method_for

        # LoRA: adapters off; an adapter continued from a workdir (SFT then DPO): that workdir's model
        started = (method_for(run.config.method, run.config.lora).keeps_start_copy
                   or resolve(config.model.path)[0] == "workdir")
        base = load_model(config.model.path, **kw) if started else None
    tokenizer = load_tokenizer(config.model.path)
    from ftjax.train.compose import compose

    composed = compose(config)
    objective = composed.objective  # its report rows: e.g. preference accuracy on held-out pairs
    held_out = None
    if not objective.generation_task or objective.task_report_rows:
        rows = objective.read_data(composed, tokenizer, None).eval
        held_out = objective.report_rows(rows, config.train.batch_size, config.train.loss_chunk)
    Evaluation(composed.eval_settings, tokenizer, FLAGS.workdir, held_out=held_out,
               generation_task=objective.generation_task).report(
        model, base, step, extra_meta={"evaluated": FLAGS.model or f"{FLAGS.workdir} step {step}"})


if __name__ == "__main__":
    cli.run_app(main)
