"""attnlab.load on tiny checkpoints of real architectures, and the user errors it must report in one line."""

from __future__ import annotations

import time

import pytest
from conftest import ALL_ARCHS

import attnlab
from attnlab.cli import main
from attnlab.errors import AttnlabError

EXPECTED = {
    # name: (architecture, n_layers, n_heads, n_kv_heads, causal, modality)
    "gpt2": ("GPT2LMHeadModel", 2, 4, 4, True, "text"),
    "llama-gqa": ("LlamaForCausalLM", 2, 4, 2, True, "text"),
    "qwen2": ("Qwen2ForCausalLM", 2, 4, 2, True, "text"),
    "bert": ("BertForMaskedLM", 2, 4, 4, False, "text"),
    "llava": ("LlavaForConditionalGeneration", 2, 4, 2, True, "vision-language"),
}


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_tiny_checkpoints_load_with_the_right_shape(loaded, name):
    m = loaded(name)
    arch, n_layers, n_heads, n_kv, causal, modality = EXPECTED[name]
    assert (m.architecture, m.n_layers, m.n_heads, m.n_kv_heads, m.causal, m.modality) == (
        arch,
        n_layers,
        n_heads,
        n_kv,
        causal,
        modality,
    )
    assert m.d_head * m.n_heads == m.d_model


def test_bos_policy_puts_a_bos_first(loaded):
    for name in ("gpt2", "llama-gqa"):
        m = loaded(name)
        ids = m.token_ids("the cat sat")
        assert ids[0] == m.tokenizer.bos_token_id
    bert = loaded("bert")
    assert bert.token_ids("the cat")[0] == bert.tokenizer.cls_token_id


def test_llava_marks_image_tokens(loaded):
    from PIL import Image

    m = loaded("llava")
    batch = m.encode(["<image>\nIs there a red square?"], images=[Image.new("RGB", (40, 40), (200, 0, 0))])
    n_patches = (32 // 8) ** 2
    assert int(batch.image_mask.sum()) == n_patches
    assert m.forward(batch).shape[:2] == batch.input_ids.shape


def test_llava_without_image_is_a_user_error(loaded):
    m = loaded("llava")
    with pytest.raises(AttnlabError, match="no image"):
        m.encode(["<image> hi"], images=[None])


def test_unknown_hub_id_fails_fast_naming_the_bundled_models(capsys):
    t0 = time.time()
    code = main(["scan", "--model", "no-such-org/no-such-model", "--dataset", "prose", "--out", "unused"])
    elapsed = time.time() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert elapsed < 15
    assert "minilm" in err and "organism-lm" in err
    assert len(err.splitlines()) == 1


def test_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AttnlabError, match="not a model checkpoint directory"):
        attnlab.load(str(tmp_path))
    with pytest.raises(AttnlabError, match="no model directory"):
        attnlab.load(str(tmp_path / "missing"))


def test_unsupported_architecture(tmp_path):
    from transformers import CTRLConfig, CTRLLMHeadModel

    CTRLLMHeadModel(CTRLConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, dff=32, n_positions=32)).save_pretrained(
        tmp_path
    )
    with pytest.raises(AttnlabError, match="unsupported architecture CTRLLMHeadModel"):
        attnlab.load(str(tmp_path))


def test_empty_and_overlong_prompts(loaded):
    m = loaded("gpt2")
    with pytest.raises(AttnlabError, match="prompt 0 is empty"):
        m.encode(["   "])
    long = "the cat sat on the mat " * 200
    with pytest.raises(AttnlabError, match="more than .* context of 256"):
        m.encode([long])
    batch = m.encode([long], truncate=True)
    assert batch.seq_len == 256


def test_cli_overlong_prompt_needs_truncate(checkpoint_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the mat " * 200 + "\nshort one\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "scan",
                "--model",
                str(checkpoint_dir / "gpt2"),
                "--probes",
                "first_token_sink",
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "--truncate" in capsys.readouterr().err
    assert (
        main(
            [
                "scan",
                "--model",
                str(checkpoint_dir / "gpt2"),
                "--probes",
                "first_token_sink",
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--quiet",
                "--truncate",
            ]
        )
        == 0
    )


def test_cuda_without_gpu_is_a_user_error(checkpoint_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert (
        main(
            [
                "scan",
                "--model",
                str(checkpoint_dir / "gpt2"),
                "--dataset",
                "prose",
                "--out",
                "unused",
                "--device",
                "cuda",
            ]
        )
        == 2
    )
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bad_probe_name_is_a_user_error(capsys):
    assert main(["scan", "--model", "minilm", "--probes", "sinks,bogus", "--dataset", "prose", "--out", "unused"]) == 2
    assert "unknown probe 'bogus'" in capsys.readouterr().err
