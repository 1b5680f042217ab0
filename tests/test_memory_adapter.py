"""The memory adapter (kvmap.models.adapter) and memory-aware fine-tuning (kvmap.training.memory_*).

The adapter's contract: off everywhere but inside ``port.importing`` (so reading, exports and answers
without memory are the base model's, bit for bit), on inside it, trainable through the import, and
saved/loaded as LoRA weights alone, refused by another base model.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from kvmap.errors import InputError, ModelLoadError
from kvmap.models import port_for
from kvmap.models.adapter import AdapterInfo, AdapterSettings, add_adapter, load_adapter, read_info, save_adapter
from kvmap.ports import ImportConfig
from kvmap.stores.tensor import TensorMemory
from tests.conftest import export_kv, tiny_llama


def _randomise_lora(model, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapted model equals the base); give it weights so the adapter acts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _memory(port, n: int = 24, seed: int = 3) -> TensorMemory:
    keys, values = export_kv(port, torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed)))
    return TensorMemory(port.layout, port.model_id, {l: (k[None], v[None]) for l, (k, v) in enumerate(zip(keys, values))})


@pytest.fixture
def adapted():
    """(base model, the same model with a random-weight adapter, the adapted model's port)."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, AdapterSettings(rank=4))
    _randomise_lora(model)
    return base, model, port_for(model, "tiny")


def test_adapter_is_off_outside_import(adapted):
    base, model, port = adapted
    ids = torch.randint(0, 128, (1, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    base_keys, base_values = export_kv(port_for(base, "tiny"), ids)
    keys, values = export_kv(port, ids)  # what a memory stores: unchanged by the adapter
    assert all(torch.equal(a, b) for a, b in zip(keys + values, base_keys + base_values))


def test_adapter_acts_inside_import_and_switches_off_after(adapted):
    base, model, port = adapted
    memory = _memory(port_for(base, "tiny"))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        with port_for(base, "tiny").importing(memory) as _:
            plain = base(ids).logits
        with port.importing(memory):
            tuned = model(ids).logits
        after = model(ids).logits
    assert (tuned - plain).abs().max() > 1e-3
    assert torch.equal(after, base(ids).logits)


def test_gradient_reaches_the_adapter_through_imported_memories(adapted):
    base, model, port = adapted
    memory = _memory(port_for(base, "tiny"))
    ids = torch.randint(0, 128, (1, 6))
    with port.importing(memory):
        loss = model(ids).logits[0, -1].logsumexp(-1)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n and "q_proj" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # base frozen


def test_key_and_value_projections_are_never_targets():
    with pytest.raises(InputError, match="k_proj"):
        AdapterSettings(targets=("q_proj", "k_proj"))


def test_save_load_roundtrip_and_refusals(adapted, tmp_path):
    base, model, port = adapted
    folder = save_adapter(model, tmp_path / "adapter", AdapterInfo("tiny", AdapterSettings(rank=4), {"steps": 3}))
    assert read_info(folder).training == {"steps": 3}
    fresh = tiny_llama()
    load_adapter(fresh, folder, "tiny")
    memory = _memory(port_for(base, "tiny"))
    ids = torch.randint(0, 128, (1, 7))
    # Every memory imported (top_k = its 24 tokens): a top-k boundary would make the comparison
    # discontinuous (equal keys of repeated tokens tie, and float16 rounding may pick the other copy).
    every = ImportConfig(top_k=24)
    with torch.no_grad():
        with port.importing(memory, every):
            want = model(ids).logits
        with port_for(fresh, "tiny").importing(memory, every):
            got = fresh(ids).logits
    assert (want - got).abs().max() < 1e-2  # stored as float16
    with pytest.raises(ModelLoadError, match="trained on 'tiny'"):
        load_adapter(tiny_llama(), folder, "another-model")
    with pytest.raises(ModelLoadError, match="not a kvmap adapter"):
        load_adapter(tiny_llama(), tmp_path, "tiny")
    (folder / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_adapter(tiny_llama(), folder, "tiny")


# -- training data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuning_data(tmp_path_factory):
    """TuningData over a 4-story pool read by a tiny model with SmolLM2's tokenizer (and vocabulary size)."""
    from kvmap.models.loading import LoadedModel, load_model
    from kvmap.training.memory_data import DataSettings, TuningData, build_pool, train_stories

    tok = load_model().tokenizer
    model = tiny_llama(vocab=len(tok))
    lm = LoadedModel(model=model, tokenizer=tok, model_id="tiny-smol-vocab")
    stories = train_stories(4, seed=0)
    pool = build_pool(lm, stories, tmp_path_factory.mktemp("pool") / "pool", progress=False)
    settings = DataSettings(n_stories=4, n_val_stories=2, memory_tokens=(256, 512), local_tokens=(0, 64))
    return lm, TuningData(lm, pool, stories, settings)


def test_examples_come_only_from_train_stories_free_of_evaluation_text():
    from kvmap.data import fairytaleqa, fairytaleqa_overlap
    from kvmap.training.memory_data import train_stories

    val = {s["story"] for s in fairytaleqa("val")}
    used = {s["story"] for s in train_stories(40, 0)}
    assert not used & val and not used & set(fairytaleqa_overlap())


def test_fact_vocabulary_is_disjoint_from_the_evaluations():
    from kvmap.eval import tasks
    from kvmap.training import memory_data as md

    assert not set(md.FACT_ADJECTIVES) & set(tasks._NIAH_WORDS)
    assert not set(md.FACT_NOUNS) & set(tasks._NIAH_NOUNS)
    statements = " ".join(t[0] + t[1] for t in md.FACT_TEMPLATES).lower()
    assert "magic number" not in statements and "pass key" not in statements


def test_examples_are_deterministic_and_put_the_answer_where_they_say(tuning_data):
    lm, data = tuning_data
    seen = {"memory": 0, "local": 0}
    for i in range(24):
        ex = data.example("train", i)
        again = data.example("train", i)
        assert ex.prompt_ids == again.prompt_ids and ex.target_ids == again.target_ids
        assert torch.equal(ex.memory.kv(0)[0], again.memory.kv(0)[0])
        if ex.kind != "fact":
            continue
        value = re.search(r"\d{6}", lm.tokenizer.decode(ex.target_ids)).group()
        in_prompt = value in lm.tokenizer.decode(ex.prompt_ids)
        assert in_prompt != ex.answer_in_memory
        seen["memory" if ex.answer_in_memory else "local"] += 1
    assert seen["memory"] > 0


def test_a_fact_in_memory_is_stored_there(tuning_data):
    """The memory of an answer-in-memory fact example holds the planted statement's K/V: the statement,
    exported again in the same context, matches memory entries."""
    lm, data = tuning_data
    ex = next(e for e in (data.example("train", i) for i in range(40)) if e.kind == "fact" and e.answer_in_memory)
    keys = ex.memory.kv(1)[0][0]  # (H, M, d)
    assert keys.shape[1] == ex.memory.n_tokens > len(ex.prompt_ids) // 4
    assert torch.isfinite(keys).all()


def _train_on(lm, data, ex, steps: int = 25) -> tuple[list[float], torch.nn.Module]:
    """A fresh rank-4 adapter on a copy of ``lm``'s model, trained on one example: (losses, the tuned model)."""
    from kvmap.models.loading import LoadedModel
    from kvmap.training.memory_tuning import MemoryTuning

    model = copy.deepcopy(lm.model)
    params = add_adapter(model, AdapterSettings(rank=4))
    module = MemoryTuning(LoadedModel(model=model, tokenizer=lm.tokenizer, model_id=lm.model_id), params, data)
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = module.example_loss(ex)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def test_training_steps_lower_the_loss_on_a_repeated_example(tuning_data):
    lm, data = tuning_data
    losses, _ = _train_on(lm, data, data.example("train", 0))
    assert losses[-1] < losses[0] - 0.5  # a random tiny model: slow, but steadily down


def test_finetune_resumes_and_writes_its_run_folder(tuning_data, tmp_path, monkeypatch):
    from kvmap.models.loading import LoadedModel
    from kvmap.training import memory_tuning

    lm, data = tuning_data
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path / "cache"))
    settings = data.settings

    def run(steps):
        fresh = LoadedModel(model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer, model_id=lm.model_id)
        return memory_tuning.finetune(tmp_path / "run", steps=steps, batch_size=1, settings=AdapterSettings(rank=2),
                                      data_settings=settings, n_val=2, val_every=2, lm=fresh, progress=False)

    import json

    run(2)
    first = json.loads((tmp_path / "run" / "training.json").read_text())
    folder = run(4)  # more steps: trains on from the step-2 checkpoint
    second = json.loads((tmp_path / "run" / "training.json").read_text())
    assert second["train_cpu_s"] > first["train_cpu_s"] > 0  # time adds up over attempts
    info = read_info(folder)
    assert info.training["steps"] == 4 and info.base_model_id == lm.model_id
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    steps = {int(r.split(",")[1]) for r in rows[1:] if r.split(",")[1]}
    assert {0, 1, 2, 3} <= steps
    assert (tmp_path / "run" / "training.png").is_file()
    assert memory_tuning.finished(tmp_path / "run", 4) and not memory_tuning.finished(tmp_path / "run", 5)
    (folder / "adapter.safetensors").unlink()  # a clone that kept the record but not the weights
    assert not memory_tuning.finished(tmp_path / "run", 4)


def test_adapter_0_imports_with_the_base_model(adapted):
    from kvmap.config import ImportConfig

    base, model, port = adapted
    memory = _memory(port_for(base, "tiny"))
    ids = torch.randint(0, 128, (1, 8))
    off = ImportConfig.from_options(adapter=0)
    assert off.options()["adapter"] is False and "adapter" not in ImportConfig().options()
    with torch.no_grad():
        with port_for(base, "tiny").importing(memory):
            plain = base(ids).logits
        with port.importing(memory, off):
            untuned = model(ids).logits
    assert torch.equal(plain, untuned)
    with pytest.raises(InputError, match="adapter is 1"):
        ImportConfig(adapter=2)


def test_ask_refuses_an_adapter_where_no_memory_is_read():
    from kvmap.cli import build_parser
    from kvmap.cli.memory_commands import ask_config

    args = build_parser().parse_args(["ask", "who?", "--memory", "m", "--adapter", "a", "--no-memory"])
    with pytest.raises(InputError, match="--adapter acts only while the model answers from memory"):
        ask_config(args)
    for mode in ("import", "splice", "import-bm25"):  # spliced blocks are read with the adapter on too
        ask_config(build_parser().parse_args(["ask", "who?", "--memory", "m", "--adapter", "a", "--mode", mode]))


def test_finetune_cli_refuses_bad_numbers(capsys):
    from kvmap.cli import main

    assert main(["finetune", "--steps", "0"]) == 1
    assert "--steps must be 1 or more" in capsys.readouterr().err
    assert main(["finetune", "--targets", "q_proj,v_proj"]) == 1
    assert "v_proj" in capsys.readouterr().err


def test_eval_methods_name_their_adapter(tmp_path):
    from kvmap.eval.methods import import_config, uses_adapter
    from kvmap.eval.runner import run_eval
    from kvmap.models.loading import LoadedModel

    assert import_config("kvmap").adapter is False  # a method name means the same in every run folder
    assert import_config("kvmap:adapter=1").adapter is True and uses_adapter("kvmap:adapter=1")
    assert not uses_adapter("kvmap") and not uses_adapter("none")
    lm = LoadedModel(model=tiny_llama(), tokenizer=None, model_id="tiny")
    with pytest.raises(InputError, match="load one with --adapter"):
        run_eval(lm, "passkey", ["kvmap:adapter=1"], [1000], 1, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_run_folder_keeps_one_adapter(tmp_path):
    import yaml

    from kvmap.eval.runner import run_eval
    from kvmap.models.loading import LoadedModel

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"task": "passkey", "model": "tiny", "seed": 0, "task_options": {},
                                                     "methods": ["kvmap:adapter=1"], "lengths": [1000], "limit": 1,
                                                     "adapter": "runs/finetune/a/adapter"}))
    lm = LoadedModel(model=tiny_llama(), tokenizer=None, model_id="tiny", adapter="runs/finetune/b/adapter")
    with pytest.raises(InputError, match="adapter='runs/finetune/a/adapter'"):
        run_eval(lm, "passkey", ["kvmap:adapter=1"], [1000], 1, out)


def test_the_instruction_can_start_the_memory(tuning_data):
    from dataclasses import replace

    from kvmap.training.memory_data import FACT_INSTRUCTION, TuningData

    lm, data = tuning_data
    with_instruction = TuningData(lm, data.pool, [s for s, _ in data.stories],
                                  replace(data.settings, instruction_in_memory=1.0))
    ex = next(e for e in (with_instruction.example("train", i) for i in range(20)) if e.kind == "fact")
    n = len(lm.tokenizer(FACT_INSTRUCTION + "\n", add_special_tokens=False)["input_ids"])
    plain = next(e for e in (data.example("train", i) for i in range(20)) if e.kind == "fact")
    assert ex.memory.n_tokens > n
    expected = with_instruction._instruction_piece()[1][0][1]  # layer 1 keys of the exported instruction, (n, H, d)
    assert torch.allclose(ex.memory.kv(1)[0][0, :, :n].transpose(0, 1), torch.from_numpy(expected).float())
    assert plain.memory.n_tokens > 0


# -- splice mode: the adapter learns to answer from spliced blocks, as `kvmap ask` answers -----------------

@pytest.fixture(scope="module")
def splice_data(tuning_data):
    from dataclasses import replace

    from kvmap.training.memory_data import TuningData

    lm, data = tuning_data
    settings = replace(data.settings, mode="splice", babi_share=0.3)
    return lm, TuningData(lm, data.pool, [s for s, _ in data.stories], settings)


def test_splice_examples_put_the_bm25_blocks_between_the_local_context_and_the_question(splice_data):
    from collections import Counter

    lm, data = splice_data
    tok = lm.tokenizer
    kinds, found, facts = Counter(), 0, 0
    for i in range(40):
        ex = data.example("train", i)
        kinds[ex.kind] += 1
        ids, texts = ex.splice_ids, ex.memory.token_texts()
        assert ids.numel() <= 8 * 64 and (ids.numel() == 0 or int(ids.max()) < ex.memory.n_tokens)
        assert bool((ids[1:] > ids[:-1]).all())  # reading order, each token once
        assert len(texts) == ex.memory.n_tokens and "<entry" not in texts[0]  # BM25 ranked real text
        after = tok.decode(ex.prompt_ids[ex.splice_at:])
        if ex.kind == "fact":
            value = re.search(r"\d{6}", tok.decode(ex.target_ids)).group()
            assert "?" in after and value not in after  # the question follows the blocks; the answer is not given
            if ex.answer_in_memory:
                facts += 1
                found += value in "".join(texts[j] for j in ids.tolist())
        else:  # chat prompts: the blocks go inside <context>, the question after it, the turn ends after the answer
            assert after.lstrip().startswith("</context>") and "Question:" in after
            assert ex.target_ids[-1] == tok.eos_token_id
        if ex.kind == "babi":
            answer = tok.decode(ex.target_ids[:-1])
            assert re.fullmatch(r"The (most recent location of \w+ is \w+|[\w ]+ is in the \w+)\.", answer), answer
    assert kinds["babi"] and kinds["qa"] and kinds["fact"]
    assert found >= facts // 2 > 0  # BM25 finds most planted facts by the question's words


def test_splice_training_steps_lower_the_loss_and_leave_the_memory_alone(splice_data):
    lm, data = splice_data
    ex = next(e for e in (data.example("train", i) for i in range(20)) if e.kind == "qa" and e.splice_ids.numel())
    stored = ex.memory.kv(1)[0].clone()
    losses, model = _train_on(lm, data, ex)
    assert losses[-1] < losses[0] - 0.5
    assert torch.equal(ex.memory.kv(1)[0], stored)  # the spliced memories are what the base model wrote
    assert all(layer.disable_adapters for layer in model._kvmap_lora_layers)  # off again after each step


def test_baselines_take_the_adapter_switch():
    from kvmap.eval.methods import check_methods, uses_adapter

    assert uses_adapter("oracle:adapter=1") and uses_adapter("rag-bm25:budget=512:adapter=1")
    assert uses_adapter("kvmap-splice-bm25:local=0:adapter=1") and not uses_adapter("oracle")
    check_methods(["oracle:adapter=1", "none:adapter=0", "truncate:adapter=1", "rag-embed:adapter=1"])
    for bad in (["oracle:adapter=2"], ["full:adapter=1"], ["streaming:adapter=1"]):
        with pytest.raises(InputError):
            check_methods(bad)
