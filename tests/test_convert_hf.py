"""GPT-2, Llama (GQA, MQA, tied), BLOOM, BERT (MLM, pretraining heads, BertModel) and T5 (v1.0, v1.1) conversion:
logits equal HF's in one process and under TP=2 / PP=2, exports load in ``transformers`` and round-trip to identical
tensors, and bad input fails with a clear error."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from launch import REPO, read_json, torchrun
import lightning_megatron as lm
from lightning_megatron import parallel
from lightning_megatron.convert import (
    ConversionError,
    build_module,
    checkpoint_to_hf,
    export_hf,
    hf_to_checkpoint,
    load_checkpoint,
    load_hf,
    module_from_checkpoint,
    module_from_hf,
)
from lightning_megatron.checkpoint import CheckpointError
from lightning_megatron.convert.bloom import Bloom
from lightning_megatron.convert.command import main as convert_main
from lightning_megatron.convert.consolidated import export_consolidated, gather_consolidated, import_consolidated
from lightning_megatron.models.bert import Bert, BertConfig
from lightning_megatron.models.gpt import GPT, GPTConfig
from lightning_megatron.models.t5 import T5, T5Config
from lightning_megatron.schedule import run_schedule

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from convert_parity import logits_of, run  # noqa: E402
from generate_hf import NEW_TOKENS, PROMPTS, greedy_tokens  # noqa: E402

VOCAB = 300
SEQ = 16


def make_hf(kind: str, path: Path) -> Path:
    """A random tiny HF model saved with its reference logits on fixed inputs."""
    torch.manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "bloom":
        # 6 heads: ALiBi slopes of a head count that is not a power of two, 3 per TP rank. Wide weights, or the
        # greedy text is the last prompt token repeated.
        config = transformers.BloomConfig(hidden_size=48, n_layer=2, n_head=6, vocab_size=VOCAB,
                                          hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.4)
        model = transformers.BloomForCausalLM(config)
    elif kind.startswith("t5"):
        config = transformers.T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=VOCAB,
                                       dropout_rate=0.0,
                                       feed_forward_proj="gated-gelu" if kind == "t5-gated" else "relu")
        if kind == "t5-gated":  # T5 v1.1 / Flan-T5: untied LM head, unscaled decoder output
            config.tie_word_embeddings = config.scale_decoder_outputs = False
        model = transformers.T5ForConditionalGeneration(config)
        model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared  # as in real checkpoints
        enc_mask = torch.ones(2, SEQ, dtype=torch.long)
        enc_mask[1, SEQ - 4:] = 0
        dec_tokens = torch.randint(0, VOCAB, (2, SEQ // 2))
        inputs = {"enc_mask": enc_mask, "dec_tokens": dec_tokens, "labels": torch.roll(dec_tokens, -1, 1),
                  "loss_mask": torch.ones(2, SEQ // 2)}
    elif kind.startswith("bert"):
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        head = transformers.BertForPreTraining if kind == "bert-pretraining" else transformers.BertForMaskedLM
        model = head(config)
        padding_mask = torch.ones(2, SEQ, dtype=torch.long)
        padding_mask[1, SEQ - 4:] = 0
        tokentype_ids = (torch.arange(SEQ) >= SEQ // 2).long().expand(2, SEQ)
        inputs = {"padding_mask": padding_mask, "tokentype_ids": tokentype_ids, "sentence_order": torch.tensor([0, 1])}
    else:
        groups = {"llama": 2, "llama-mqa": 1, "llama-tied": 4}[kind]
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=groups, vocab_size=VOCAB,
                                          max_position_embeddings=64, tie_word_embeddings=kind == "llama-tied")
        model = transformers.LlamaForCausalLM(config)
    model.eval()
    with torch.no_grad():
        for param in model.parameters():  # break HF's init symmetries (zero biases, unit norms)
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    if kind.startswith("t5"):
        inputs = {"enc_tokens": tokens, **inputs}
    else:
        inputs = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, SEQ), **inputs}
    torch.save({"inputs": inputs, "logits": hf_logits(path, inputs)}, path / "reference.pt")
    return path


def hf_logits(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the HF model saved at ``path`` (its own class, from config.json, with no custom code)."""
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(path).eval()
    kwargs = {}
    if "padding_mask" in inputs:
        kwargs = {"attention_mask": inputs["padding_mask"], "token_type_ids": inputs["tokentype_ids"]}
    if "enc_tokens" in inputs:
        kwargs = {"attention_mask": inputs["enc_mask"], "decoder_input_ids": inputs["dec_tokens"]}
    with torch.no_grad():
        output = model(inputs.get("tokens", inputs.get("enc_tokens")), **kwargs)
    return output.logits if hasattr(output, "logits") else output.prediction_logits


KINDS = ("gpt2", "llama", "llama-mqa", "llama-tied", "bloom", "bert", "bert-pretraining", "t5", "t5-gated")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf(kind, root / kind) for kind in KINDS}


def assert_same_tensors(a: Path, b: Path) -> None:
    left = {k: v for f in a.glob("*.safetensors") for k, v in load_file(f).items()}
    right = {k: v for f in b.glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(left) == sorted(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_single_process_logits_and_export(hf_dirs, one_rank):
    diffs = run([str(p) for p in hf_dirs.values()], one_rank, "tp1pp1")
    for kind, path in hf_dirs.items():
        assert diffs[str(path)] < 1e-4, (kind, diffs)
        exported = Path(f"{path}-export-tp1pp1")
        assert_same_tensors(path, exported)
        reference = torch.load(path / "reference.pt")
        torch.testing.assert_close(hf_logits(exported, reference["inputs"]), reference["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--tp", 2), ("--pp", 2)], ids=["tp2", "pp2"])
def test_parallel_logits_and_export(hf_dirs, layout, tmp_path):
    # T5 has no pipeline-parallel support yet (test_bad_input_errors checks the error).
    hf_dirs = {k: p for k, p in hf_dirs.items() if layout[0] == "--tp" or not k.startswith("t5")}
    paths = [str(p) for p in hf_dirs.values()]
    torchrun("convert_parity.py", 2, *paths, *layout, "--out", tmp_path / "diffs.json", timeout=400)
    diffs = read_json(tmp_path / "diffs.json")
    assert set(diffs) == set(paths)
    assert max(diffs.values()) < 1e-4, diffs
    tag = "tp2pp1" if layout[0] == "--tp" else "tp1pp2"
    for path in hf_dirs.values():
        assert_same_tensors(path, Path(f"{path}-export-{tag}"))


def test_cli_round_trip_sharded_and_checkpoint_loads(hf_dirs, one_rank, tmp_path, capsys):
    source = hf_dirs["llama"]
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert convert_main(["hf-to-megatron", "--hf", str(source), "--out", str(ckpt), "--tp", "2", "--pp", "2"]) == 0
    meta = json.loads((ckpt / "lightning_megatron.json").read_text())
    assert meta["architecture"] == "llama" and meta["layout"]["tensor_model_parallel_size"] == 2
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in load_file(ckpt / "model.safetensors")
    assert convert_main(["megatron-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--max-shard-size", "0.00005"]) == 0
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1 and (back / "model.safetensors.index.json").exists()
    assert_same_tensors(source, back)
    assert_same_tensors(ckpt, hf_to_checkpoint(back, tmp_path / "again"))  # reads a sharded HF directory too
    reference = torch.load(source / "reference.pt")
    torch.testing.assert_close(hf_logits(back, reference["inputs"]), reference["logits"])
    module = build_module(module_from_checkpoint(ckpt), one_rank)
    load_checkpoint(module, ckpt)
    torch.testing.assert_close(logits_of(module, reference["inputs"]), reference["logits"], atol=1e-4, rtol=0)


def test_loss_hook_weights_tokens(hf_dirs, one_rank):
    class Weighted(GPT):
        def loss(self, token_losses, batch):
            weights = batch["weights"]
            return (token_losses * weights).sum(), weights.sum()

    path = hf_dirs["gpt2"]
    config = dataclasses.replace(module_from_hf(path).config, seed=7, hidden_dropout=0.1)  # fields free to differ
    module = build_module(Weighted(config), one_rank)
    module.chunks.eval()
    load_hf(module, path)
    reference = torch.load(path / "reference.pt")
    inputs = {**reference["inputs"], "weights": torch.rand(2, SEQ)}
    module.collected_logits = []
    result = run_schedule(module.forward_step, module.chunks, [inputs], SEQ, forward_only=True)
    # Megatron's softmax also spans the padding rows of the vocabulary (zero logits after import).
    padded = torch.nn.functional.pad(reference["logits"], (0, module.config.padded_vocab_size() - VOCAB))
    token_losses = torch.nn.functional.cross_entropy(padded.reshape(-1, padded.shape[-1]),
                                                     inputs["labels"].reshape(-1), reduction="none")
    expected = (token_losses * inputs["weights"].reshape(-1)).sum() / inputs["weights"].sum()
    assert abs(float(result.loss) - float(expected)) < 1e-4
    torch.testing.assert_close(module.collected_logits[0], reference["logits"], atol=1e-4, rtol=0)


def test_megatron_dataset_key_names(hf_dirs, one_rank):
    """Batches keyed as megatron-core's BERT/T5 datasets name them give the same logits."""
    renames = {"bert-pretraining": {"tokens": "text", "tokentype_ids": "types", "sentence_order": "is_random"},
               "t5": {"enc_tokens": "text_enc", "dec_tokens": "text_dec"}}
    for kind, names in renames.items():
        module = build_module(module_from_hf(hf_dirs[kind]), one_rank)
        module.chunks.eval()
        load_hf(module, hf_dirs[kind])
        inputs = torch.load(hf_dirs[kind] / "reference.pt")["inputs"]
        renamed = {names.get(key, key): value for key, value in inputs.items()}
        torch.testing.assert_close(logits_of(module, renamed), logits_of(module, inputs), atol=0, rtol=0)


def _rewrite_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        if file.is_file():
            (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_input_errors(hf_dirs, tmp_path, one_rank, capsys):
    gpt2, llama = hf_dirs["gpt2"], hf_dirs["llama"]
    with pytest.raises(ConversionError, match="not supported; supported HF architectures"):
        hf_to_checkpoint(_rewrite_config(gpt2, tmp_path / "a", architectures=["MambaForCausalLM"]), tmp_path / "o1")
    with pytest.raises(ConversionError, match="lacks 12 tensor.*transformer.h.2"):
        hf_to_checkpoint(_rewrite_config(gpt2, tmp_path / "b", n_layer=3), tmp_path / "o2")
    with pytest.raises(ConversionError, match="no rule uses: transformer.h.1"):
        hf_to_checkpoint(_rewrite_config(gpt2, tmp_path / "c", n_layer=1), tmp_path / "o3")
    assert convert_main(["hf-to-megatron", "--hf", str(llama), "--out", str(tmp_path / "o4"), "--tp", "4"]) == 2
    assert "num_query_groups=2 is not divisible by tensor_model_parallel_size=4" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"):
        hf_to_checkpoint(gpt2, tmp_path / "o5", tensor_model_parallel_size=3)
    wide = build_module(GPT(module_from_hf(gpt2).config.__class__(**{
        **module_from_hf(gpt2).config.__dict__, "ffn_hidden_size": 128})), one_rank)
    with pytest.raises(ConversionError, match="differs from"):
        load_hf(wide, gpt2)
    ckpt = hf_to_checkpoint(gpt2, tmp_path / "o6")
    with pytest.raises(ConversionError, match="linear_fc1.weight' has shape \\[256, 64\\].*expects \\[128, 64\\]"):
        load_checkpoint(wide, ckpt)
    with pytest.raises(ConversionError, match="T5 does not support pipeline parallelism"):
        hf_to_checkpoint(hf_dirs["t5"], tmp_path / "o7", pipeline_model_parallel_size=2)
    with pytest.raises(ConversionError, match="apply_residual_connection_post_layernorm=True is not supported"):
        post_ln = _rewrite_config(hf_dirs["bloom"], tmp_path / "d", apply_residual_connection_post_layernorm=True)
        hf_to_checkpoint(post_ln, tmp_path / "o8")
    with pytest.raises(ConversionError, match="not BLOOM shaped"):
        Bloom().config_to_hf(dataclasses.replace(module_from_hf(hf_dirs["bloom"]).config, embedding_layernorm=False))
    with pytest.raises(ConversionError, match="exists and is not empty"):
        checkpoint_to_hf(ckpt, gpt2)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def transformers_greedy(path: Path) -> list[list[int]]:
    """What ``transformers`` generates greedily from each prompt of ``generate_hf.PROMPTS`` alone."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = []
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                          min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        tokens.append(expected[0, len(prompt):].tolist())
    return tokens


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bloom"])
def test_converted_model_generates_what_transformers_generates(hf_dirs, one_rank, kind):
    expected = transformers_greedy(hf_dirs[kind])
    assert greedy_tokens(str(hf_dirs[kind]), one_rank) == expected


@pytest.mark.slow
def test_bloom_generates_what_transformers_generates_under_tp2(hf_dirs, tmp_path):
    path = str(hf_dirs["bloom"])
    torchrun("generate_hf.py", 2, path, "--tp", 2, "--out", tmp_path / "tokens.json", timeout=400)
    assert read_json(tmp_path / "tokens.json")[path] == transformers_greedy(hf_dirs["bloom"])


CONSOLIDATED_MODELS = {
    "llama": lambda **c: GPT(GPTConfig.llama_tiny(VOCAB, num_layers=2, **c)),  # gated MLP, grouped-query attention
    "bert": lambda **c: Bert(BertConfig.tiny(VOCAB, num_layers=2, binary_head=True, **c)),  # tied, vocab bias
    "t5": lambda **c: T5(T5Config.tiny(VOCAB, tie_embeddings=True, **c)),  # two stacks, aliased output layer
}


@pytest.mark.parametrize("kind", sorted(CONSOLIDATED_MODELS))
def test_consolidated_export_then_import_gives_the_same_weights(one_rank, tmp_path, kind):
    make = CONSOLIDATED_MODELS[kind]
    source, target = build_module(make(seed=1), one_rank), build_module(make(seed=2), one_rank)
    path = tmp_path / "weights.safetensors"
    export_consolidated(source, path)
    assert not torch.equal(next(source.chunks.parameters()), next(target.chunks.parameters()))
    import_consolidated(target, path)
    theirs = dict(target.chunks.named_parameters())
    for name, tensor in source.chunks.named_parameters():
        assert torch.equal(theirs[name], tensor), name
    stored = load_file(path)
    assert stored["embedding.word_embeddings.weight"].shape[0] == source.config.padded_vocab_size()  # padding kept
    unpadded = gather_consolidated(source, unpad=True)
    assert unpadded["embedding.word_embeddings.weight"].shape[0] == VOCAB
    assert sorted(unpadded) == sorted(stored)


def test_consolidated_import_names_what_does_not_fit(one_rank, tmp_path):
    path = tmp_path / "weights.safetensors"
    export_consolidated(build_module(CONSOLIDATED_MODELS["llama"](), one_rank), path)
    shallower = build_module(GPT(GPTConfig.llama_tiny(VOCAB, num_layers=1)), one_rank)
    with pytest.raises(CheckpointError, match="holds 6 tensor.s. the model lacks: decoder.layers.1.input_layernorm"):
        import_consolidated(shallower, path)
    other_vocab = build_module(GPT(GPTConfig.llama_tiny(VOCAB + 1, num_layers=2)), one_rank)
    with pytest.raises(CheckpointError, match="holds a vocabulary of 300, the model has 301"):
        import_consolidated(other_vocab, path)


def test_build_module_gives_the_fields_the_strategy_gives(one_rank):
    from lightning_megatron.precision import MegatronPrecision
    from lightning_megatron.strategy import transformer_fields

    recompute = lm.RecomputeConfig("full", "uniform", 1)
    module = build_module(GPT(GPTConfig.tiny(VOCAB, num_layers=2)), one_rank, recompute=recompute)
    config = module.megatron_config
    expected = transformer_fields(one_rank, MegatronPrecision("32-true"), recompute, torch.device("cpu"))
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.recompute_granularity == "full" and config.calculate_per_token_loss and not config.batch_p2p_comm


def test_export_names_the_tokenizers_special_tokens(one_rank, tmp_path):
    """transformers needs bos/eos ids inside the vocabulary (its GPT-2 default, 50256, is not in a 4096 one)."""
    from lightning_megatron.data.tokenizer import bundled_tokenizer
    from lightning_megatron.models.gpt import GPTConfig

    tokenizer = bundled_tokenizer()
    config = GPTConfig.gpt2_124m(vocab_size=tokenizer.vocab_size, num_layers=2, hidden_size=64, num_attention_heads=4,
                            seq_length=64, hidden_dropout=0.1, attention_dropout=0.1)
    module = build_module(GPT(config), one_rank)
    export_hf(module, tmp_path / "hf", tokenizer=tokenizer.path)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["bos_token_id"] == hf_config["eos_token_id"] == tokenizer.eod < hf_config["vocab_size"]
    assert (hf_config["resid_pdrop"], hf_config["attn_pdrop"]) == (0.1, 0.1)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.generation_config.eos_token_id == tokenizer.eod


@pytest.mark.slow
def test_an_imported_gpt_generates_and_evaluates_without_a_recipe(tmp_path):
    """hf-to-megatron output is a checkpoint like any other for generate/evaluate: architecture and tokenizer come
    from the directory; the HF config's special tokens and dropout survive the round trip."""
    import shutil
    import subprocess

    from launch import child_env
    from lightning_megatron.data.tokenizer import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=tokenizer.vocab_size, n_positions=64,
                                     bos_token_id=tokenizer.eod, eos_token_id=tokenizer.eod)  # dropout 0.1
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    model.save_pretrained(hf)
    shutil.copy(tokenizer.path, hf / "tokenizer.json")
    assert convert_main(["hf-to-megatron", "--hf", str(hf), "--out", str(ckpt)]) == 0
    assert json.loads((ckpt / "lightning_megatron.json").read_text())["config"]["hidden_dropout"] == 0.1

    prompt = "In the beginning"
    ids = tokenizer.encode(prompt)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              pad_token_id=tokenizer.eod)[0, len(ids):].tolist()
    for recipe in ([], ["--config", str(REPO / "recipes" / "gpt-tiny.yaml")]):  # the checkpoint's own model wins
        out = tmp_path / f"completions{len(recipe)}.jsonl"
        result = subprocess.run([sys.executable, "-m", "lightning_megatron", "generate", "--ckpt", str(ckpt),
                                 "--prompt", prompt, "--max-new-tokens", "8", "--output", str(out), *recipe],
                                capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(out.read_text())["tokens"] == expected
    (tmp_path / "held.txt").write_text("In the beginning God created the heaven and the earth.\n")
    result = subprocess.run([sys.executable, "-m", "lightning_megatron", "evaluate", "--ckpt", str(ckpt), "--text",
                             str(tmp_path / "held.txt")], capture_output=True, text=True, cwd=REPO, env=child_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["text"]["perplexity"] > 1

    assert convert_main(["megatron-to-hf", "--ckpt", str(ckpt), "--out", str(back)]) == 0
    exported = json.loads((back / "config.json").read_text())
    assert exported["eos_token_id"] == exported["bos_token_id"] == tokenizer.eod
    assert (exported["resid_pdrop"], exported["attn_pdrop"]) == (0.1, 0.1)


@pytest.mark.parametrize("pooler", [True, False], ids=["pooler", "no-pooler"])
def test_bert_model_encoder_imports_with_fresh_heads_and_exports_back(one_rank, tmp_path, pooler):
    """A ``BertModel`` (no pretraining heads) gives our encoder its hidden states, gets the heads a new Bert of its
    seed starts with, and ``megatron-to-hf`` writes it back as the same ``BertModel``."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    hf = transformers.BertModel(config, add_pooling_layer=pooler).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    source, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    hf.save_pretrained(source)
    assert convert_main(["hf-to-megatron", "--hf", str(source), "--out", str(ckpt)]) == 0
    module = build_module(module_from_checkpoint(ckpt), one_rank)
    module.chunks.eval()
    load_checkpoint(module, ckpt)
    assert module.config.binary_head == pooler  # megatron has a pooler only beside its binary head

    fresh = dict(build_module(Bert(module.config), one_rank).chunks.named_parameters())
    heads = [name for name, _ in module.chunks.named_parameters() if "head" in name or "output_layer" in name]
    assert len(heads) == (5 + 2 * pooler)
    for name, tensor in module.chunks.named_parameters():
        if name in heads:
            assert torch.equal(tensor, fresh[name]), name

    tokens = torch.randint(0, VOCAB, (2, SEQ))
    padding = torch.ones(2, SEQ, dtype=torch.long)
    padding[1, SEQ - 4:] = 0
    types = (torch.arange(SEQ) >= SEQ // 2).long().expand(2, SEQ)
    hidden = []
    hook = parallel.unwrap(module.chunks[0]).encoder.register_forward_hook(lambda m, i, out: hidden.append(out))
    logits_of(module, {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, SEQ), "padding_mask": padding,
                       "tokentype_ids": types, "sentence_order": torch.tensor([0, 1])})
    hook.remove()
    with torch.no_grad():
        expected = hf(tokens, attention_mask=padding, token_type_ids=types).last_hidden_state
    assert (hidden[0].transpose(0, 1) - expected)[padding.bool()].abs().max() <= 1e-4

    assert convert_main(["megatron-to-hf", "--ckpt", str(ckpt), "--out", str(back)]) == 0
    assert json.loads((back / "config.json").read_text())["architectures"] == ["BertModel"]
    assert_same_tensors(source, back)
    assert type(transformers.AutoModel.from_pretrained(back)).__name__ == "BertModel"
