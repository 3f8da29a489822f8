"""Config parsing and the errors a user sees: unknown keys, bad values, missing presets and
data files all raise ConfigError naming the key (and ``sea-train`` exits with status 2).

Pure Python, no model is built: the whole file runs in a few seconds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("draccus")
pytest.importorskip("grain")

from sea_jax.train import main as cli  # noqa: E402
from sea_jax.train.config import Config, ConfigError, MeshConfig, parse_config, preset_names  # noqa: E402


# (overrides, text the error must contain: the key it names)
BAD_OVERRIDES = [
    (["--model.widht", "3"], "model.widht"),
    (["--bogus=1"], "bogus"),
    (["--train.steps", "-1"], "train.steps"),
    (["--train.steps", "abc"], "train.steps"),
    (["--data.source", "foo"], "data.source"),
    (["--data.seq_len", "0"], "data.seq_len"),
    (["--data.source", "text"], "data.train_files"),
    (["--mesh.data", "0"], "mesh.data"),
    (["--mesh.data", "-1", "--mesh.fsdp", "-1"], "mesh"),
    (["--mesh.distributed", "maybe"], "mesh.distributed"),
    (["--optim.schedule", "linear"], "optim.schedule"),
    (["--optim.lr", "0"], "optim.lr"),
    (["--optim.b2", "1.0"], "optim.b2"),
    (["--optim.min_lr_ratio", "2"], "optim.min_lr_ratio"),
    (["--optim.groups", "[{name: a}]"], "optim.groups[a].pattern"),
    (["--checkpoint.keep", "0"], "checkpoint.keep"),
    (["--objective", "x"], "objective"),
    (["--compile_only", "true"], "topology"),
    (["--train.global_batch_size", "7", "--train.grad_accum_steps", "2"], "train.global_batch_size"),
    (["--model.attention", "bogus"], "attention"),
    (["--model.num_heads", "3"], "num_heads"),
    (["--metrics.peak_flops_per_device", "-5"], "metrics.peak_flops_per_device"),
]


@pytest.mark.parametrize("overrides,key", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_config(overrides, preset="tiny")


def test_overrides_apply_and_keep_the_preset(tmp_path):
    cfg = parse_config(["--optim.lr", "1e-3", "--model.attention=sparsek", "--mesh.fsdp", "2"], preset="tiny")
    assert cfg.optim.lr == 1e-3 and cfg.model.attention == "sparsek" and cfg.mesh.fsdp == 2
    # untouched keys of the overridden sections keep the preset's values (not the class defaults)
    assert cfg.model.vocab_size == 264 and cfg.optim.schedule == "cosine" and cfg.data.seq_len == 256
    # without a preset the Config defaults (= tiny) are the base
    cfg = parse_config(["--model.width", "64"])
    assert cfg.model.width == 64 and cfg.model.vocab_size == Config().model.vocab_size


@pytest.mark.parametrize("text,key", [
    ("model:\n  widht: 3\n", "widht"),
    ("modle:\n  width: 3\n", "modle"),
    ("train:\n  steps: many\n", "train.steps"),
    ("optim:\n  schedule: linear\n", "optim.schedule"),
    ("model: [1, 2\n", "YAML"),
])
def test_bad_yaml_preset_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config([], preset=str(path))


def test_missing_preset_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match="no preset named 'nope'.*tiny"):
        parse_config([], preset="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config([], preset=str(tmp_path / "absent.yaml"))


def test_every_shipped_preset_parses_and_round_trips():
    names = preset_names()
    assert {"tiny", "gpu_135m_4k", "gpu_135m_16k", "gpu_135m_32k", "pod_v5p"} <= set(names)
    for name in names:
        cfg = parse_config([], preset=name)
        again = parse_config([], preset=name)
        assert cfg.to_dict() == again.to_dict()
    long = {n: parse_config([], preset=f"gpu_135m_{n}") for n in ("4k", "16k", "32k")}
    assert [c.data.seq_len for c in long.values()] == [4096, 16384, 32768]
    for c in long.values():  # the SmolLM2-135M shape
        m = c.model
        assert (m.num_layers, m.width, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size) == (30, 576, 9, 3, 64, 49152)


def test_mesh_shape_errors_name_the_mesh():
    from sea_jax.train.mesh import mesh_shape

    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 2) == (1, 2, 1)
    with pytest.raises(ConfigError, match="mesh: the fixed axes"):
        mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ConfigError, match="mesh: .* needs 4 devices but 8"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def _pipeline(cfg):
    from sea_jax.train.data import build_pipeline

    return build_pipeline(cfg.data, global_batch_size=2, grad_accum_steps=1, eval_batches=1,
                          model_vocab_size=cfg.model.vocab_size, process_index=0, process_count=1)


def test_missing_or_wrong_data_files_name_the_key(tmp_path):
    missing = tmp_path / "absent.txt"
    cfg = parse_config(["--data.source=text", f"--data.train_files=[{missing}]"], preset="tiny")
    with pytest.raises(ConfigError, match=r"data\.train_files: file .*absent\.txt.* does not exist"):
        _pipeline(cfg)
    wrong = tmp_path / "docs.txt"
    wrong.write_text("hello\n\nworld\n")
    cfg = parse_config(["--data.source=jsonl", f"--data.train_files=[{wrong}]"], preset="tiny")
    with pytest.raises(ConfigError, match=r"data\.train_files: .*must end in \.jsonl"):
        _pipeline(cfg)
    cfg = parse_config(["--data.source=text", f"--data.train_files=[{wrong}]",
                        f"--data.validation_files=[{tmp_path / 'val.txt'}]"], preset="tiny")
    with pytest.raises(ConfigError, match=r"data\.validation_files: file .*val\.txt.* does not exist"):
        _pipeline(cfg)
    cfg = parse_config(["--data.tokenizer=nonesuch"], preset="tiny")
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        _pipeline(cfg)


def test_jsonl_without_the_text_field_names_the_key(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(40)) + "\n")
    cfg = parse_config(["--data.source=jsonl", f"--data.train_files=[{path}]"], preset="tiny")
    with pytest.raises(ConfigError, match=r"data\.train_files"):
        _pipeline(cfg)


def test_cli_exits_2_with_the_key_on_stderr(capsys):
    assert cli.main(["--preset", "tiny", "--model.widht", "3"]) == 2
    assert "model.widht" in capsys.readouterr().err
    assert cli.main(["--preset", "nope"]) == 2
    assert "no preset named 'nope'" in capsys.readouterr().err
    assert cli.main(["--preset", "tiny", "--model.attention", "sea", "--resume", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "attention: sea" in out and "resume: true" in out
