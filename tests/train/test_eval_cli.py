"""sea-eval and sea-visualize (sea_jax.train.evaluate / visualize) on a tiny random teacher
written as an HF safetensors directory and on a tiny sea-train checkpoint of a SEA student
initialised from it. Perplexities are checked against an explicit float64 loop over the
windows; the picture's panels against explicit softmax / resize loops. float32 models,
tolerance 1e-4 relative on perplexities."""

import json
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_pretrained import write_hf_dir

from sea_jax.data import corpus
from sea_jax.data.tokenizers import load_tokenizer
from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel
from sea_jax.train import evaluate, visualize

TINY = dict(vocab_size=264, width=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=48, init_std=0.1)
SEA = {"k": 4, "t_m": 16, "block_q": 16, "block_k": 16, "chunk": 16}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval") / "teacher"
    write_hf_dir(LanguageModel(LMConfig(**TINY), rngs=nnx.Rngs(0)), directory)
    return directory


@pytest.fixture(scope="module")
def sea_checkpoint(tmp_path_factory, teacher_dir):
    """checkpoints/ of a 2-step sea-train run: SEA student initialised from the teacher."""
    pytest.importorskip("draccus")
    pytest.importorskip("grain")
    from sea_jax.train.config import parse_config
    from sea_jax.train.loop import train

    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = parse_config([
        f"--init_from={teacher_dir}", "--model.attention=sea", f"--model.attention_options={json.dumps({'sea': SEA})}",
        "--data.source=synthetic", "--data.seq_len=32", "--train.steps=2", "--train.global_batch_size=2",
        "--train.eval_every=0", "--checkpoint.every_steps=0", "--checkpoint.async_save=false",
        "--metrics.progress_bar=false", "--metrics.tensorboard=false", "--optim.lr=1e-2", "--optim.warmup_steps=0",
        f"--output_dir={out}",
    ])
    train(cfg)
    return out / "checkpoints"


def _loop_perplexity(model, tokens, T, windows):
    """exp(mean NLL) over the first ``windows`` non-overlapping windows, one window at a time,
    log-softmax in float64 numpy."""
    forward = nnx.jit(lambda m, x: m(x).logits)
    total, count = 0.0, 0
    for w in range(windows):
        row = np.asarray(tokens[w * T:(w + 1) * T])
        logits = np.asarray(forward(model, jnp.asarray(row[None], jnp.int32))[0], np.float64)
        for t in range(T - 1):
            z = logits[t] - logits[t].max()
            total -= z[row[t + 1]] - math.log(np.exp(z).sum())
            count += 1
    return math.exp(total / count), count


def test_sea_eval_teacher(teacher_dir, tmp_path, capsys):
    out = tmp_path / "teacher.json"
    rc = evaluate.main([
        "--teacher", str(teacher_dir), "--tokenizer", "byte", "--seq-len", "40", "--max-windows", "3",
        "--batch-size", "2", "--passkey-lengths", "250", "--passkey-depths", "0,1", "--passkey-samples", "2",
        "--json", str(out),
    ])
    assert rc == 0
    record = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "validation perplexity (T=40, 3 windows" in text and "T=250" in text
    from sea_jax.pretrained import load_pretrained

    model = load_pretrained(teacher_dir).model
    tokens = corpus.load_tokens("wiki", "validation", load_tokenizer("byte"))
    want, count = _loop_perplexity(model, tokens, 40, 3)
    assert record["perplexity"]["predictions"] == count == 3 * 39
    np.testing.assert_allclose(record["perplexity"]["perplexity"], want, rtol=1e-4)
    assert record["attention"] == ["dense", "dense"]
    cells = record["passkey"]["cells"]
    assert [(c["length"], c["depth"], c["samples"]) for c in cells] == [(250, 0.0, 2), (250, 1.0, 2)]
    assert record["passkey"]["by_length"]["250"] == sum(c["correct"] for c in cells) / 4


def test_sea_eval_checkpoint_and_dynamic_k(sea_checkpoint, tmp_path):
    from sea_jax.train.checkpoint import load_checkpoint

    rc = evaluate.main(["--checkpoint", str(sea_checkpoint), "--no-passkey", "--seq-len", "32", "--max-windows", "2"])
    assert rc == 0
    record = json.loads((sea_checkpoint / "eval.json").read_text())  # the default JSON place
    assert record["attention"] == ["sea", "sea"]
    model, _ = load_checkpoint(sea_checkpoint)
    tokens = corpus.load_tokens("wiki", "validation", load_tokenizer("byte"))  # the run's data.tokenizer
    want, _ = _loop_perplexity(model, tokens, 32, 2)
    np.testing.assert_allclose(record["perplexity"]["perplexity"], want, rtol=1e-4)

    # "dynamic k": the override reaches the cores (k = 1 keeps fewer keys: another perplexity)
    out = tmp_path / "k1.json"
    rc = evaluate.main(["--checkpoint", str(sea_checkpoint), "--no-passkey", "--seq-len", "32", "--max-windows", "2",
                        "--attention-options", '{"sea": {"k": 1}}', "--json", str(out)])
    assert rc == 0
    k1 = json.loads(out.read_text())
    assert k1["attention_options"]["sea"]["k"] == 1 and k1["attention_options"]["sea"]["t_m"] == 16
    model_k1 = evaluate.load_checkpoint_model(sea_checkpoint, attention_options={"sea": {"k": 1}})[0]
    want_k1, _ = _loop_perplexity(model_k1, tokens, 32, 2)
    np.testing.assert_allclose(k1["perplexity"]["perplexity"], want_k1, rtol=1e-4)
    assert abs(k1["perplexity"]["perplexity"] - record["perplexity"]["perplexity"]) > 1e-6


@pytest.mark.parametrize("argv, needle", [
    (["--seq-len", "1"], "--seq-len"),
    (["--passkey-samples", "0"], "--passkey-samples"),
    (["--tokenizer", "nope"], "--tokenizer"),
    (["--no-perplexity", "--no-passkey"], "nothing to evaluate"),
])
def test_sea_eval_bad_arguments(teacher_dir, capsys, argv, needle):
    assert evaluate.main(["--teacher", str(teacher_dir), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_sea_eval_bad_sources(tmp_path, capsys):
    assert evaluate.main(["--teacher", str(tmp_path / "missing.gguf")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither --checkpoint nor --teacher
        evaluate.main(["--seq-len", "8"])


def test_resized_estimate_matches_loop():
    rng = np.random.default_rng(0)
    for T, t_m in ((7, 4), (13, 8), (5, 8)):
        est = rng.normal(size=(T, t_m))
        got = visualize.resized_estimate(est, T)
        for t in range(T):
            L = t + 1
            # key j of row t reads cell floor((j + 0.5) / L * t_m) (nearest neighbour over the prefix)
            logits = np.array([est[t, min(math.floor(Fraction(2 * j + 1, 2 * L) * t_m), t_m - 1)] for j in range(L)])
            p = np.exp(logits - logits.max())
            np.testing.assert_allclose(got[t, :L], p / p.sum(), rtol=1e-12)
            assert np.all(got[t, L:] == 0)


def test_attention_maps_teacher_panel_and_mask():
    teacher = LanguageModel(LMConfig(**TINY), rngs=nnx.Rngs(0))
    student = LanguageModel(LMConfig(**TINY, attention="sea", attention_options={"sea": SEA}), rngs=nnx.Rngs(1))
    T, layer, head = 24, 1, 1
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 264, size=(1, T)), jnp.int32)
    maps = visualize.attention_maps(teacher, student, tokens, layer, head)
    # teacher panel: explicit causal softmax of the teacher's own rotated q, k at that layer
    q, k, _ = visualize.layer_internals(teacher, tokens, layer, return_aux=False)
    q, k = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]
    kv = head // (TINY["num_heads"] // TINY["num_kv_heads"])
    for t in range(T):
        s = np.array([q[t, head] @ k[j, kv] for j in range(t + 1)]) / math.sqrt(TINY["head_dim"])
        p = np.exp(s - s.max())
        np.testing.assert_allclose(maps["teacher"][t, :t + 1], p / p.sum(), rtol=1e-4, atol=1e-6)
        assert np.all(maps["teacher"][t, t + 1:] == 0)
    mask = maps["mask"]
    assert mask.shape == (T, T) and not np.any(np.triu(mask, 1))  # causal
    np.testing.assert_allclose(maps["recall"], (maps["teacher"] * mask).sum() / T, rtol=1e-6)
    np.testing.assert_allclose(maps["estimate"].sum(1), 1.0, rtol=1e-9)


def test_sea_visualize_png(teacher_dir, tmp_path):
    import matplotlib.image

    out = tmp_path / "attention.png"
    rc = visualize.main(["--teacher", str(teacher_dir), "--tokenizer", "byte", "--sea-options", json.dumps(SEA),
                         "--layer", "1", "--head", "1", "--seq-len", "48", "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 20_000
    image = matplotlib.image.imread(out)[..., :3]
    h, w, _ = image.shape
    # each third of the figure (one panel) holds more than a flat colour
    for i in range(3):
        panel = image[h // 5: 4 * h // 5, i * w // 3 + w // 30:(i + 1) * w // 3 - w // 30]
        assert panel.std() > 0.05, i


def test_sea_visualize_from_checkpoint(sea_checkpoint, tmp_path, capsys):
    out = tmp_path / "ckpt.png"
    # the teacher defaults to the run's init_from; the tokenizer to its data.tokenizer
    assert visualize.main(["--checkpoint", str(sea_checkpoint), "--layer", "0", "--seq-len", "40",
                           "--out", str(out)]) == 0
    assert out.stat().st_size > 20_000
    assert visualize.main(["--checkpoint", str(sea_checkpoint), "--layer", "2", "--out", str(out)]) == 2
    assert "--layer must be a SEA layer of the student, one of [0, 1]" in capsys.readouterr().err
    assert visualize.main(["--checkpoint", str(sea_checkpoint), "--seq-len", "2000", "--out", str(out)]) == 2
    assert "--seq-len" in capsys.readouterr().err
