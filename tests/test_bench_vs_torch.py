"""The benchmark's two sides implement the same model: same weights and batches, same losses."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from flaxpod.model.transformer import Transformer  # noqa: E402
from flaxpod.train.objectives import forward  # noqa: E402

from tools.bench_vs_torch import bench_config, parity_losses  # noqa: E402
from tools.torch_reference import TorchTransformer, load_flaxpod_params  # noqa: E402

TINY = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=16", "data.batch_size=4"]


def test_parity_check_first_two_steps_agree():
    # The benchmark's model (nanoGPT's shakespeare_char, shrunk), with biases to check their
    # conversion, two micro-batches and a z-loss to check the loss and gradient scaling, and a
    # large first step (no warm-up) so that the second loss depends on the optimizers agreeing.
    extra = ["model.bias=true", "train.grad_accum=2", "optim.z_loss=1e-3", "optim.warmup_steps=0", "optim.lr=1e-2"]
    cfg = bench_config("configs/shakespeare_char.yaml", TINY + extra, vocab=65)
    (jax_first, torch_first), (jax_second, torch_second) = parity_losses(cfg, steps=2)
    assert jax_first == pytest.approx(torch_first, abs=1e-4)
    assert jax_second == pytest.approx(torch_second, abs=1e-4)
    # Random tokens over 65 ids: the initial loss is about log(128 rows), and the step moved it.
    assert 4.0 < jax_first < 5.5
    assert abs(jax_second - jax_first) > 1e-3


def test_llama_reference_gives_flaxpods_logits():
    # RoPE, RMSNorm, SwiGLU, grouped-query attention (2 query heads per key/value head) and an
    # untied head, loaded from flaxpod's parameters.
    llama = ["model.family=llama", "model.n_head=4", "model.n_kv_head=2", "model.tie_embeddings=false"]
    cfg = bench_config("configs/shakespeare_char.yaml", TINY + llama, vocab=65).model
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    params = nnx.to_pure_dict(state)
    tokens = np.random.default_rng(0).integers(0, 65, size=(2, cfg.seq_len), dtype=np.int32)
    expected = np.asarray(jax.jit(lambda p, t: forward(graphdef, p, {"inputs": t}))(params, tokens))

    model = TorchTransformer(cfg)
    load_flaxpod_params(model, jax.device_get(params))
    with torch.no_grad():
        got = model(torch.from_numpy(tokens).long()).numpy()
    assert np.abs(expected).max() > 0.1  # not a degenerate all-zero comparison
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_cpu_benchmark_alternates_three_sides(tmp_path):
    """tools/bench_cpu.py on a shrunken shape: flaxpod and the twin agree on the first loss, the reference
    script is run with the shape's arguments each round, and the ratio is taken against the faster torch."""
    from tools.bench_cpu import bench_shape

    fake = tmp_path / "torch_ref.py"  # stands in for ../shared/bench/torch_ref.py (tests never read ../shared)
    fake.write_text(
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "args = dict(zip(a[::2], a[1::2]))\n"
        "assert args['--n_layer'] == '4' and args['--block_size'] == '64' and args['--bias'] == '0', args\n"
        "json.dump({'median_ms': 0.001 * int(args['--iters'])}, open(args['--json'], 'w'))\n"
    )
    result = bench_shape("small", fake, rounds=3, warmup=1, overrides=TINY[1:])  # keep the shape's 4 layers
    assert result["first_loss"]["flaxpod"] == pytest.approx(result["first_loss"]["twin"], abs=1e-4)
    ms = result["ms_per_step"]
    assert ms["torch_ref"] == pytest.approx(0.001 * (1 + 20))  # warm-up + the shape's 20 steps, in ms
    assert len(result["ms_per_step_rounds"]["flaxpod"]) == 3
    assert result["ratio_fastest_torch_over_flaxpod"] == pytest.approx(ms["torch_ref"] / ms["flaxpod"])


def test_cpu_benchmark_runs_each_shape_in_its_own_process(tmp_path):
    """With several shapes, each is measured in a child process set up as its own job would be (devices and
    allocator are per process); the parent merges their figures into one table and JSON file. No warm-up
    steps (--warmup 0) is allowed."""
    import json
    import os

    from tools.bench_cpu import main

    out = tmp_path / "bench.json"
    shrink = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=16", "data.batch_size=4"]
    assert main(["--shapes", "small,big", "--rounds", "1", "--warmup", "0", "--json", str(out), *shrink]) == 0
    shapes = json.loads(out.read_text())["shapes"]
    assert sorted(shapes) == ["big", "small"]
    pids = {name: shapes[name]["process_id"] for name in shapes}
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    for result in shapes.values():
        assert result["overrides"] == shrink and result["ms_per_step"]["flaxpod"] > 0
        assert result["first_loss"]["flaxpod"] == pytest.approx(result["first_loss"]["twin"], abs=1e-4)


def test_cpu_benchmark_bad_override_is_one_line_before_any_child(capsys):
    from tools.bench_cpu import main

    assert main(["--shapes", "small,big", "model.n_layr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'model.n_layr'; did you mean 'model.n_layer'?", err
