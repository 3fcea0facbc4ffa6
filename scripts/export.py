"""Export a trained run: `python scripts/export.py --workdir=DIR --format=hf|peft|gguf --out=DIR`.

  --format=hf    the merged model as an HF folder (config.json, safetensors shards, tokenizer,
                 generation_config.json) for transformers / vLLM, in the dtype it was trained in
  --format=peft  the LoRA adapter (adapter_config.json + adapter_model.safetensors) for
                 peft.PeftModel.from_pretrained(base, DIR)
  --format=gguf  the merged model as one GGUF file for llama.cpp / Ollama (--out=FILE.gguf, or a folder
                 that gets model-QUANT.gguf), 2-D tensors in --quant=f32|f16|bf16|q8_0|q4_0|q4_1|q5_0|q5_1;
                 for K-quants run llama.cpp's llama-quantize on an f16 export

Takes the best checkpoint (lowest eval loss, else the latest) unless --step says otherwise.
Tensors are fetched one at a time from the sharded model; multi-host: the same command on every
process, process 0 writes. The export is written beside --out and renamed into place once complete: an
interrupted one leaves the previous export (or nothing) there.
"""

from absl import app, flags

from ftjax import cli

flags.DEFINE_string("workdir", None, "The training workdir to export.")
flags.DEFINE_enum("format", "hf", ["hf", "peft", "gguf"],
                  "hf: merged HF model folder; peft: LoRA adapter folder; gguf: merged model as a GGUF file.")
flags.DEFINE_string("out", None, "Output folder (--format=gguf: a .gguf file or a folder).")
flags.DEFINE_string("quant", "f16", "--format=gguf: type of the 2-D tensors (f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1).")
flags.DEFINE_string("step", "best", "Checkpoint: best (lowest eval loss, else the latest), latest or a step number.")
flags.DEFINE_string("dtype", None, "Dtype of the written weights (default: as trained, e.g. float32 stays float32).")
flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard for --format=hf (e.g. 5GB, 500MB).")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.init_distributed()
    import jax

    from ftjax import stop
    from ftjax.errors import ConfigError
    from ftjax.interop.atomic_out import replaced_when_complete
    from ftjax.workdir import config_from_workdir, load_trained

    config = config_from_workdir(FLAGS.workdir)
    if FLAGS.format == "gguf":
        from ftjax.api import model_config
        from ftjax.interop.export_gguf import check_architecture, check_quant

        check_quant(FLAGS.quant)  # before any weight is loaded
        check_architecture(model_config(FLAGS.workdir))  # e.g. a mixture of experts: no llama.cpp layout written
    from ftjax.methods import method_for

    if FLAGS.format not in method_for(config.method, config.lora).export_formats:
        raise ConfigError(f"{FLAGS.workdir}: --format=peft needs a LoRA run, this one is method={config.method} "
                          "(export it with --format=hf)")
    with stop.phase(f"export of {FLAGS.workdir}"):
        run = load_trained(FLAGS.workdir, FLAGS.step)
        stop.safe_point()  # a stop asked for while loading ends here, before anything is written
    if FLAGS.format == "hf":
        from ftjax.interop.export_hf import export_hf

        with replaced_when_complete(FLAGS.out, jax.process_index() == 0) as partial, stop.phase(f"writing {partial}"):
            export_hf(run.model, partial, source=run.config.model.path, dtype=FLAGS.dtype,
                      max_shard_size=FLAGS.max_shard_size)
        out = FLAGS.out
    elif FLAGS.format == "gguf":
        from pathlib import Path

        from ftjax.interop.export_gguf import export_gguf

        out = Path(FLAGS.out)
        out = out if out.suffix == ".gguf" else out / f"model-{FLAGS.quant.lower()}.gguf"
        out = export_gguf(run.model, out, source=run.config.model.path, quant=FLAGS.quant)
    else:
        from ftjax.interop.peft import export_peft

        with replaced_when_complete(FLAGS.out, jax.process_index() == 0) as partial, stop.phase(f"writing {partial}"):
            export_peft(run.model, partial, base_model_name_or_path=run.config.model.path, dtype=FLAGS.dtype)
        out = FLAGS.out
    if jax.process_index() == 0:
        print(f"exported step {run.step} of {FLAGS.workdir} as {FLAGS.format} to {out}")


if __name__ == "__main__":
    cli.run_app(main)
