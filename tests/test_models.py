"""``smollm2``: the GGUF file, converted once to a safetensors checkpoint, holds what Transformers reads from it;
a model folder's fingerprint, taken from several threads at once."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # the conversion and Transformers' own GGUF load: ~30 s
def test_smollm2_checkpoint_holds_transformers_own_reading_of_the_gguf_file(tmp_path, monkeypatch):
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perpair.models import smollm2_checkpoint, smollm2_gguf

    library = (gguf.GGUFReader, gguf.get_tensor_name_map)
    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path))
    folder = smollm2_checkpoint()
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == library  # the conversion's shortcuts are undone

    path = smollm2_gguf()
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    ours = load_file(folder / "model.safetensors")
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied to the input embedding, stored once
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    text = "<|im_start|>user\nWhat is 1+1? Ünïcödé, emoji 🙂 and  two spaces.<|im_end|>\n"
    their_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == their_tokenizer(text)["input_ids"]
    assert smollm2_checkpoint() == folder  # converted once: a second use reads the cache


def test_model_fingerprints_taken_from_several_threads_at_once(tmp_path, monkeypatch):
    """``perpair run`` fingerprints models from several threads of one process (arms side by side, each finding its
    reference log-probs); the remembered file hashes go through a temporary file of each thread's own, so no thread
    renames away another's (FileNotFoundError, when the name was the process's)."""
    from concurrent.futures import ThreadPoolExecutor

    from perpair.models import model_fingerprint

    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    with ThreadPoolExecutor(8) as pool:
        fingerprints = list(pool.map(lambda _: model_fingerprint(str(folder)), range(400)))
    assert len(set(fingerprints)) == 1 and (tmp_path / "cache" / "file_hashes.json").is_file()


def test_weights_rewritten_at_the_same_size_and_mtime_are_another_model(tmp_path, monkeypatch):
    """The remembered file hashes were keyed by path, size and mtime: weights rewritten in place at the same size
    whose writer set the mtime (extracted from an archive of fixed times, rsync -a, cp -p) kept the old hash, and
    perpair run skipped every stage of the model, the old weights' numbers reported. The ctime, which no tool sets,
    is in the key too."""
    import os

    from perpair.models import model_fingerprint

    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    first = model_fingerprint(str(folder))
    times = weights.stat()
    weights.write_bytes(bytes(reversed(range(256))) * 64)  # other weights, the same size
    os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))  # and the same mtime
    assert model_fingerprint(str(folder)) != first


def test_a_cache_that_is_a_file_is_named(tmp_path, monkeypatch):
    """PERPAIR_CACHE naming a file: one line naming the variable (it was "error: PATH: File exists")."""
    from cli_inprocess import run_cli_inprocess

    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("PERPAIR_CACHE", str(cache))
    result = run_cli_inprocess("train", "--model", "smollm2", "--data", tmp_path / "pairs.parquet", "--out",
                               tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: PERPAIR_CACHE {cache}: a file, not a folder; point it at a folder (or unset it for ~/.cache/perpair)")


def test_version_is_the_installed_one():
    from importlib.metadata import version

    from cli_inprocess import run_cli_inprocess

    result = run_cli_inprocess("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"perpair {version('perpair')}"


def test_a_lora_adapter_folder_is_refused_as_a_model(tmp_path):
    """`perpair train --lora` saves OUT/adapter (lora.merge is false by default); given to `perpair eval` as the model
    it loaded the adapter, then crashed with a traceback looking for a tokenizer there. Refused by name instead."""
    import json

    from conftest import run_cli

    adapter = tmp_path / "runs" / "dpo" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "m"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    pairs = tmp_path / "pairs.parquet"
    run_cli("prepare", rows, "-o", pairs)
    for extra in ((), ("config.json", "tokenizer.json")):
        # saved with its base's config.json and tokenizer (as some trainers save an adapter): it passed as a model
        # and failed in Transformers ("no file named model.safetensors"), not named as an adapter
        for name in extra:
            (adapter / name).write_text("{}")
        result = run_cli("eval", "preference", "--model", adapter, "--ref", adapter, "--data", pairs, "-o",
                         tmp_path / "out", check=False)
        assert result.returncode == 2 and result.stderr == (
            f"error: model {adapter}: a LoRA adapter (adapter_config.json), not a whole model; give the model with "
            "the adapter merged in (perpair train --set lora.merge=true saves it to OUT/model)\n"), extra
        assert not (tmp_path / "out").exists()


def test_a_hub_model_or_dataset_is_keyed_by_the_commit_it_loads_from(tmp_path, monkeypatch, capsys):
    """A Hub id stood for itself in every key (answers, judgments, annotations, reference log-probs, a run's stages):
    when its repository moved, the old commit's results were served. Now the key holds the commit: online the one
    the Hub serves (what from_pretrained and load_dataset download), offline (or with no answer from the Hub) the
    one the local cache's ref points to (what they read)."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi, constants

    from perpair.eval.alpaca_eval import JudgeConfig, judge_identity
    from perpair.eval.generate import GenerationConfig, generation_identity
    from perpair.models import hub_commit, model_fingerprint
    from perpair.pipeline.run import _source_identity

    served = {("org/model", "model"): "a" * 40, ("org/data", "dataset"): "c" * 40}
    asked = []

    def repo_info(self, repo_id, *, repo_type=None, revision=None, timeout=None):
        asked.append((repo_id, repo_type or "model", revision))
        if ("org/gone", "model") == (repo_id, repo_type or "model"):
            raise ConnectionError("no network")
        return SimpleNamespace(sha=served[(repo_id, repo_type or "model")])

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    refs = tmp_path / "hub" / "models--org--gone" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("e" * 40)
    hub_commit.cache_clear()
    try:
        before = model_fingerprint("org/model")
        answers = generation_identity(before, GenerationConfig())
        judgments = judge_identity(JudgeConfig(judge="org/model"))
        data = _source_identity("org/data")
        assert before == f"hub:org/model@{'a' * 40}" and data == ["org/data", "c" * 40]
        assert model_fingerprint("org/gone") == f"hub:org/gone@{'e' * 40}"  # the Hub unreachable: the cache's
        # and the rest of the process reads the Hub's files from the cache, saying so once
        assert constants.HF_HUB_OFFLINE and capsys.readouterr().err == (
            "note: the Hugging Face Hub could not be reached (no network): org/gone and every other Hub model or "
            "dataset are read from the local cache for the rest of this command (HF_HUB_OFFLINE=1 skips asking)\n")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

        served.update({("org/model", "model"): "b" * 40, ("org/data", "dataset"): "d" * 40})  # the repositories move
        hub_commit.cache_clear()  # a new process
        after = model_fingerprint("org/model")
        assert after != before and generation_identity(after, GenerationConfig()) != answers
        assert judge_identity(JudgeConfig(judge="org/model")) != judgments
        assert _source_identity("org/data") != data
        assert _source_identity("hub:org/data", "main") == ["hub:org/data", "d" * 40]
        assert _source_identity("org/data", "f" * 40) == ["org/data", "f" * 40]  # a commit: nothing to ask

        # offline: the local cache's ref, never the Hub
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub_commit.cache_clear()
        asked.clear()
        (tmp_path / "hub" / "models--org--model" / "refs").mkdir(parents=True)
        (tmp_path / "hub" / "models--org--model" / "refs" / "main").write_text("9" * 40 + "\n")
        assert model_fingerprint("org/model") == f"hub:org/model@{'9' * 40}" and not asked
    finally:
        hub_commit.cache_clear()


def test_only_an_unreachable_hub_with_the_repository_cached_reads_the_cache_from_then_on(tmp_path, monkeypatch):
    """An answer of the Hub (no such repository, no access), a proxy set wrong, or a repository the cache lacks
    leave the process online: the loaders then ask, and retry, as they do without perpair."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi, constants

    from perpair.models import hub_commit, resolve_model

    class ProxyError(ConnectionError):
        pass

    class HubDown(Exception):
        response = SimpleNamespace(status_code=503)

    class NotFound(Exception):
        response = SimpleNamespace(status_code=404)

    errors = {"org/refused": NotFound("404"), "org/proxy": ProxyError("proxy"), "org/absent": ConnectionError("x"),
              "org/down": HubDown("503")}

    def repo_info(self, repo_id, **_):
        raise errors[repo_id]

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for repo in ("refused", "proxy", "down"):
        (tmp_path / "hub" / f"models--org--{repo}" / "refs").mkdir(parents=True)
        (tmp_path / "hub" / f"models--org--{repo}" / "refs" / "main").write_text("e" * 40)
    hub_commit.cache_clear()
    try:
        assert hub_commit("org/refused") == hub_commit("org/proxy") == "e" * 40 and hub_commit("org/absent") is None
        assert not constants.HF_HUB_OFFLINE
        # the Hub down is unreachable too; a Hub id is asked for as it is resolved, before anything loads it (`perpair
        # run` loaded the tokenizer to check its config first, and took 2 minutes of retries there)
        assert resolve_model("org/down") == "org/down" and constants.HF_HUB_OFFLINE
        assert hub_commit("org/down") == "e" * 40
    finally:
        hub_commit.cache_clear()


def test_a_model_id_the_hub_refuses_is_named_before_any_work(tmp_path, monkeypatch):
    """`perpair eval alpaca-eval --judge ORG/TYPO` generated every answer, then failed as the judge loaded (and a
    typo in `perpair run`'s judge passed its checks). The Hub's refusal of the id, no such repository or a gated
    one, is now said as the id is resolved, in one line; nothing is written."""
    from huggingface_hub import constants

    from cli_inprocess import run_cli_inprocess
    from conftest import SHARED_DATA
    from llama_server import LoopbackServer, Reply
    from perpair.models import hub_commit

    asked = []

    async def hub(request):  # the Hub's answers to a missing and to a gated repository
        asked.append(request.path)
        gated = "gated" in request.path
        return Reply(status=401 if gated else 404, headers={"X-Error-Code": "GatedRepo" if gated else "RepoNotFound",
                                                            "X-Error-Message": "refused"})

    ae = SHARED_DATA / "alpaca_eval"
    args = ("--model", "smollm2", "--limit", "2", "--offline", "--reference",
            ae / "reference_outputs_gpt4_1106_preview.json.gz", "--judge-prompt",
            ae / "judge_prompt_alpaca_eval_clf.txt", "--difficulty", ae / "instruction_difficulty_reconstructed.csv",
            "--data-dir", ae)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with LoopbackServer(hub) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        hub_commit.cache_clear()
        try:
            for judge, said in (("org/typo", "no such folder, and the Hub has no model of that id (or a private "
                                             "one this machine's Hugging Face token cannot read"),
                                ("org/gated", "no such folder, and the Hub's model of that id is gated")):
                out = tmp_path / judge.replace("/", "-")
                result = run_cli_inprocess("eval", "alpaca-eval", *args, "--judge", judge, "-o", out)
                assert result.returncode == 2 and result.stderr.startswith(f"error: judge model {judge}: {said}") \
                    and result.stderr.count("\n") == 1, result.stderr
                assert not out.exists()
        finally:
            hub_commit.cache_clear()
    assert {"/api/models/org/typo", "/api/models/org/gated"} <= set(asked)


@pytest.mark.slow  # a training in a process of its own: the Hub library reads its endpoint when imported
def test_a_cached_hub_model_trains_without_asking_an_unreachable_hub_again(tiny_model_dir, uf_pairs, tmp_path):
    """On a machine without network, `perpair train --model ORG/NAME` of a model in the Hub cache took 3 minutes
    for one step (SmolLM2, and this tiny model alike), printing 80 lines of retries: Transformers asks for each
    optional file of a tokenizer, its chat templates folder and an adapter config, five times each. The first
    unanswered question now reads the rest from the cache, in one note."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "1" * 40
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9")  # nothing answers there
    result = subprocess.run([sys.executable, "-m", "perpair", "train", "--model", "org/tiny", "--data", str(uf_pairs),
                             "--steps", "1", "--batch-size", "2", "--max-length", "64", "--threads", "1",
                             "--out", str(tmp_path / "out"), "--set", f"reference_cache={tmp_path / 'ref'}"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if not line.startswith("step ")]  # (the progress lines)
    assert len(notes) == 1 and notes[0].startswith("note: the Hugging Face Hub could not be reached ("), notes
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_a_tokenizer_loaded_again_is_a_copy_of_the_folder_as_it_is_now(tmp_path):
    """load_tokenizer remembers a folder's tokenizer (a load ~0.3 s, `perpair run` loads each model's at every stage
    and evaluation) and hands out copies: what one caller sets (padding side, pad token) reaches no other, and a
    tokenizer saved again into the folder (a template edited in place) is the one loaded next."""
    from transformers import AutoTokenizer

    from conftest import save_tiny_llama
    from perpair.models import load_tokenizer, tokenizer_fingerprint

    folder = str(save_tiny_llama(tmp_path / "model", layers=1))
    fresh = AutoTokenizer.from_pretrained(folder)
    first = load_tokenizer(folder)
    first.padding_side, first.pad_token = "left", "<|im_start|>"
    second = load_tokenizer(folder)
    assert second is not first and (second.padding_side, second.pad_token) == (fresh.padding_side, fresh.pad_token)
    assert (fresh.padding_side, fresh.pad_token) != ("left", "<|im_start|>")
    assert second("hello world")["input_ids"] == first("hello world")["input_ids"]
    assert second.name_or_path == folder

    # the copies share one Rust tokenizer (a copy costs no re-read of tokenizer.json), and calls interleaved on two
    # copies set up differently give what two tokenizers loaded apart give
    assert second.backend_tokenizer is first.backend_tokenizer
    apart = AutoTokenizer.from_pretrained(folder)
    apart.padding_side, apart.pad_token = "left", "<|im_start|>"
    texts = ["hi", "hello there, world"]
    for _ in range(2):
        assert first(texts, padding=True, truncation=True, max_length=3) == apart(texts, padding=True, truncation=True,
                                                                                  max_length=3)
        assert second(texts)["input_ids"] == fresh(texts)["input_ids"]

    # what a call leaves in the shared Rust tokenizer (truncation, padding) is no part of the fingerprint, which
    # keys the reference cache and the stages: the same before and after use, and the call's settings left in place
    before = tokenizer_fingerprint(second)
    second.pad_token = fresh.pad_token or "<|im_end|>"
    second(texts, padding=True, truncation=True, max_length=3)
    left = (second.backend_tokenizer.truncation, second.backend_tokenizer.padding)
    assert left[0] is not None and left[1] is not None
    second.pad_token = fresh.pad_token
    assert tokenizer_fingerprint(second) == before == tokenizer_fingerprint(fresh)
    assert (second.backend_tokenizer.truncation, second.backend_tokenizer.padding) == left

    second.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
    second.save_pretrained(folder)
    assert load_tokenizer(folder).chat_template == second.chat_template


def test_a_model_folder_with_a_file_cut_short_is_one_error_naming_the_model(tmp_path):
    """A tokenizer.json or weights file cut short (a copy or download interrupted) ended `perpair train` and
    `perpair eval preference` in the parser's traceback (json's JSONDecodeError, safetensors' SafetensorError), and
    a generation_config.json cut short was passed over for defaults without a word; now one line naming the model
    or the file, exit 2, and a training's OUT holds nothing trained."""
    import shutil

    from conftest import run_cli, save_tiny_llama

    good = save_tiny_llama(tmp_path / "good", layers=1)
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(f'{{"prompt": "q{i}", "chosen": "yes {i}", "rejected": "no"}}\n' for i in range(4)))
    pairs = tmp_path / "pairs.parquet"
    run_cli("prepare", rows, "-o", pairs)
    cannot = "model {model}: Transformers cannot load"
    for name, problem in (("tokenizer.json", cannot + " its tokenizer (JSONDecodeError: "),
                          ("model.safetensors", cannot + " it (SafetensorError: Error while deserializing header"),
                          ("generation_config.json",  # (from_pretrained took defaults for it, silently)
                           "It looks like the config file at '{model}/generation_config.json' is not a valid JSON")):
        model = tmp_path / f"cut-{name}"
        shutil.copytree(good, model)
        whole = (good / name).read_bytes()
        (model / name).write_bytes(whole[: len(whole) // 2])
        for command in (("train", "--model", model, "--data", pairs, "--out", tmp_path / "out" / name, "--steps", 1,
                         "--batch-size", 2, "--max-length", 64),
                        ("eval", "preference", "--model", model, "--ref", good, "--data", pairs, "-o",
                         tmp_path / "eval" / name)):
            result = run_cli(*command, check=False)
            lines = result.stderr.splitlines()
            assert result.returncode == 2 and len(lines) == 1, result.stderr
            assert lines[0].startswith("error: " + problem.format(model=model)), lines[0]
        assert not (tmp_path / "out" / name / "metrics.jsonl").exists()
        assert not (tmp_path / "out" / name / "model").exists()


def test_a_model_config_without_its_model_type_is_one_error_naming_the_model(tmp_path):
    """A config.json that is JSON but not a model's config (no ``model_type``: another program's file, or one
    edited) ended `perpair train` in Transformers' ValueError traceback, from the check of its router's loss; now
    one line naming the model, exit 2."""
    import json

    from conftest import run_cli, save_tiny_llama

    model = save_tiny_llama(tmp_path / "model", layers=1)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(f'{{"prompt": "q{i}", "chosen": "yes {i}", "rejected": "no"}}\n' for i in range(4)))
    pairs = tmp_path / "pairs.parquet"
    run_cli("prepare", rows, "-o", pairs)
    result = run_cli("train", "--model", model, "--data", pairs, "--out", tmp_path / "out", "--steps", 1,
                     "--batch-size", 2, "--max-length", 64, check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: model {model}: Transformers cannot load its config (ValueError: "), lines[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("name", "blank"), [("chat_template.jinja", ""), ("chat_template.jinja", "  \n"),
                                             ("tokenizer_config.json", " \n\t")])
def test_a_blank_chat_template_is_refused_naming_its_file(tmp_path, name, blank):
    """A chat template of whitespace only (in chat_template.jinja, or in tokenizer_config.json where there is no
    such file) rendered every conversation as blanks: `perpair train` and `perpair run` ended in a floating point
    exception, the local teacher annotated blank prompts with exit 0. load_tokenizer, which every command loads a
    tokenizer with, refuses it as it refuses an empty one, naming the file the template came from."""
    import json

    from conftest import save_tiny_llama
    from perpair.errors import PerpairError
    from perpair.models import load_tokenizer

    folder = save_tiny_llama(tmp_path / "model", layers=1)
    if name == "tokenizer_config.json":
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "chat_template": blank}))
    else:
        (folder / name).write_text(blank)
    with pytest.raises(PerpairError) as refused:
        load_tokenizer(str(folder))
    assert str(refused.value) == (f"model {folder}: {folder / name}: the chat template is empty or only whitespace "
                                  "(every conversation would render as blanks); restore the model's chat template")


def test_a_tokenizer_config_that_is_a_folder_is_refused_naming_it(tmp_path):
    """A model folder whose tokenizer_config.json is a folder: Transformers passed it over without a word and
    `perpair train` ran with exit 0, on a tokenizer without its settings. Now one line naming it, exit 2, before
    OUT is written."""
    from conftest import run_cli, save_tiny_llama

    model = save_tiny_llama(tmp_path / "model", layers=1)
    name = "tokenizer_config.json"
    (model / name).unlink()
    (model / name).mkdir()
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(f'{{"prompt": "q{i}", "chosen": "yes {i}", "rejected": "no"}}\n' for i in range(4)))
    pairs = tmp_path / "pairs.parquet"
    run_cli("prepare", rows, "-o", pairs)
    out = tmp_path / "out"
    result = run_cli("train", "--model", model, "--data", pairs, "--out", out, "--steps", 1, "--batch-size", 2,
                     "--max-length", 64, "--set", f"reference_cache={tmp_path / 'refcache'}", check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: model {model}: {model / name} is not a readable file (a folder, or a link to nothing); "
        "Transformers would load the tokenizer without it"], result.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


@pytest.mark.parametrize("name", ["chat_template.jinja", "special_tokens_map.json", "added_tokens.json"])
def test_a_tokenizer_file_that_is_a_folder_or_a_dangling_link_is_refused(tmp_path, name):
    """The other tokenizer files Transformers passes over when they are no file: a chat_template.jinja that is a
    folder left the tokenizer without a template, and the local teacher then annotated with the plain "User: ..."
    layout, exit 0."""
    from conftest import save_tiny_llama
    from perpair.errors import PerpairError
    from perpair.models import load_tokenizer

    folder = save_tiny_llama(tmp_path / "model", layers=1)
    (folder / name).unlink(missing_ok=True)
    for make in (lambda p: p.mkdir(), lambda p: p.symlink_to(tmp_path / "nothing")):
        make(folder / name)
        with pytest.raises(PerpairError, match=f"^model {folder}: {folder / name} is not a readable file"):
            load_tokenizer(str(folder))
        (folder / name).rmdir() if (folder / name).is_dir() else (folder / name).unlink()
