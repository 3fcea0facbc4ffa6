"""Chat with a base model or a trained workdir: one or more prompts, or (without --prompt) a chat on stdin.

  python scripts/generate.py --model=smollm2-135m-instruct --prompt="Hello!"
  python scripts/generate.py --model=WORKDIR                      # a chat; its best checkpoint; --step=latest|N
"""

import sys
import time

from absl import app, flags

from ftjax import cli
from ftjax.config import DEFAULT_MODEL

flags.DEFINE_string("model", DEFAULT_MODEL, "HF folder, .gguf file, model name or training workdir.")
flags.DEFINE_string("step", None, "With a training workdir: best (the default), latest or a step number.")
flags.DEFINE_multi_string("prompt", [], "User message(s); each gets its own reply (batched).")
flags.DEFINE_string("system", None, "Optional system message.")
flags.DEFINE_boolean("interactive", False, "With --prompt: chat on stdin after the replies (without --prompt "
                     "the chat is what runs).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per reply.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy decoding.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold (with temperature > 0).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("dtype", "float32", "Compute and parameter dtype (float32, bfloat16).")
FLAGS = flags.FLAGS


def _conversation(user: str, history: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    return system + history + [{"role": "user", "content": user}]


def main(argv):
    del argv
    cli.init_distributed()
    import ftjax
    from ftjax.generate import generate

    t0 = time.perf_counter()
    model = ftjax.load_model(FLAGS.model, dtype=FLAGS.dtype, step=FLAGS.step)
    tokenizer = ftjax.load_tokenizer(FLAGS.model)
    print(f"loaded {FLAGS.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
              seed=FLAGS.seed)
    if FLAGS.prompt:
        t0 = time.perf_counter()
        replies = generate(model, tokenizer, [_conversation(p, []) for p in FLAGS.prompt], **kw)
        for prompt, reply in zip(FLAGS.prompt, replies):
            print(f"user> {prompt}\nassistant> {reply}\n")
        print(f"generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if FLAGS.interactive or not FLAGS.prompt:
        _chat(model, tokenizer, kw)


def _read_message() -> str | None:
    """One user message from stdin; a line ending in a backslash continues on the next. None: leave."""
    lines = []
    while True:
        try:
            line = input("you> " if not lines else "...> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        if not lines and line.strip() in ("/exit", "/quit"):
            return None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def _chat(model, tokenizer, kw: dict) -> None:
    """The interactive loop: the conversation is kept; /reset clears it; /exit, Ctrl-D or Ctrl-C leaves."""
    from ftjax.generate import generate

    print(f"chatting with {FLAGS.model}: type a message and press Enter (end a line with \\ to continue on the "
          "next); /reset clears the conversation; /exit or Ctrl-D leaves.", flush=True)
    history: list[dict] = []
    while (message := _read_message()) is not None:
        if not message.strip():
            continue
        if message.strip() == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        reply = generate(model, tokenizer, _conversation(message, history), **kw)
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        print(f"assistant> {reply}", flush=True)


if __name__ == "__main__":
    app.run(cli.run_main(main))
