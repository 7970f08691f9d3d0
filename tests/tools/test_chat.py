"""`xtuner chat`: prompts file -> JSONL, a pseudo-terminal session, adapters, 4-bit, bad input.

The demo's exported model is untrained, so its answers would be noise. The tests plant a
"next token" table into it: with every attention output and MLP output projection zeroed,
the last hidden state is the current token's embedding, and the output head maps chosen
tokens to chosen successors. Greedy decoding then follows a fixed chain (end of the prompt ->
'planet' -> ' word' -> ' numbers' -> '<|im_end|>' -> ' the' -> ' the' ...), so the template,
the stop words and the history can be checked exactly.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from tests.tools.test_train_cli import run_xtuner
from xtuner.tools import chat

CHAIN_TOKENS = ["planet", "Ġword", "Ġnumbers", "<|im_end|>", "Ġthe"]
ANSWER = "planet word numbers"
QWEN = dict(user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", end="<|im_end|>\n")


def _plant_chain(model, tokenizer) -> None:
    """Makes greedy decoding follow CHAIN_TOKENS after the template's 'assistant\\n'."""
    ids = tokenizer.convert_tokens_to_ids(CHAIN_TOKENS)
    assert tokenizer.unk_token_id not in ids, "a chain token is missing from the demo vocab"
    start = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids[-1]
    the = ids[-1]
    pairs = list(zip([start, *ids[:-1]], ids)) + [(the, the)]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        head = model.lm_head.weight
        head.zero_()
        for src, dst in pairs:
            head[dst] += 10 * embed[src] / embed[src].norm()


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory, demo_assets) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32)
    _plant_chain(model, tokenizer)
    path = str(tmp_path_factory.mktemp("chat") / "chain_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _answers(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prompts_file_applies_template_stops_and_keeps_history(tmp_path, chain_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        'Reverse the word.\n{"input": "Add the two numbers.\\n12 + 30"}\n'
        '{"input": "again", "new_conversation": true}\n'
    )
    out = tmp_path / "answers.jsonl"
    common = ["chat", chain_model, "--prompt-template", "qwen_chat", "--temperature", "0"]
    common += ["--max-new-tokens", "8"]
    result = run_xtuner(
        *common, "--system", "Be brief.", "--prompts", str(prompts), "--output", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, third = _answers(str(out))

    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert first["prompt"] == "<s>" + system + QWEN["user"].format("Reverse the word.")
    # Stopped at the template's stop word: 4 new tokens, not 8; the stop word is not kept.
    assert (first["answer"], first["stopped_by"], first["new_tokens"]) == (
        ANSWER,
        "<|im_end|>",
        4,
    )
    # The second turn sees the first one, encoded as training encodes a conversation.
    history = "<s>" + system + QWEN["user"].format("Reverse the word.") + ANSWER + QWEN["end"]
    assert second["prompt"] == history + QWEN["user"].format("Add the two numbers.\n12 + 30")
    assert second["turn"] == 2 and second["answer"] == ANSWER
    # A new conversation forgets the history (and the system prompt stays on its first turn).
    assert third["turn"] == 1
    assert third["prompt"] == "<s>" + system + QWEN["user"].format("again")


def _chat(capsys, monkeypatch, *argv: str, stdin: str) -> dict:
    """``xtuner chat ... --prompts -`` in this process; the one answer it writes."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert chat.main([*argv, "--prompts", "-"]) == 0, capsys.readouterr().err[-3000:]
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    return {**json.loads(line), "stderr": captured.err}


def test_stop_words_from_the_command_line(capsys, monkeypatch, chain_model):
    # A multi-token stop word ends the reply earlier (the decoded-text check, not the EOS ids).
    args = ["--prompt-template", "qwen_chat", "--temperature", "0", "--stop-words", "word numbers"]
    answer = _chat(capsys, monkeypatch, chain_model, *args, stdin="Reverse the word.\n")
    assert (answer["answer"], answer["stopped_by"]) == ("planet", "word numbers")


class _Terminal:
    """Reads a pseudo-terminal; ``wait_for`` finds markers in order, so output that arrives
    together with an earlier marker (e.g. the next prompt right after a reply) is not lost."""

    def __init__(self, fd: int):
        self.fd = fd
        self.chunks: list[bytes] = []
        self.seen = 0

    def wait_for(self, marker: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout  # immune to wall-clock steps
        while True:
            text = b"".join(self.chunks)
            found = text.find(marker, self.seen)
            if found >= 0:
                self.seen = found + len(marker)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in time; got {text[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.chunks.append(os.read(self.fd, 4096))
                except OSError as exc:  # the child closed the terminal
                    raise AssertionError(f"terminal closed before {marker!r}: {text!r}") from exc


def test_interactive_session_streams_under_a_pseudo_terminal(chain_model):
    # Without a template the prompt ends with the user's last token: ' the' repeats itself,
    # 60 tokens, printed word by word as they are generated.
    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "xtuner.entry_point", "chat", chain_model]
    cmd += ["--temperature", "0", "--max-new-tokens", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    terminal = _Terminal(leader)
    try:
        terminal.wait_for(b">>> ", 300)  # generous: the start is slow on a loaded machine
        os.write(leader, b"say the\n\n")
        terminal.wait_for(b"the the the the the the the the the the\r\n", 120)
        terminal.wait_for(b">>> ", 120)
        os.write(leader, b"EXIT\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)
    chunks = terminal.chunks
    reply = b"".join(chunks).decode().split("say the", 1)[1].split(">>> ")[0]
    assert reply.count(" the") == 60
    echo = next(i for i, c in enumerate(chunks) if b"say the" in c)
    answer_chunks = [c for c in chunks[echo + 1 :] if b" the" in c]
    assert len(answer_chunks) >= 3, f"the reply came in one piece, not streamed: {chunks!r}"


def _lora_on_head(base: str, save_dir: str, hidden: int | None = None) -> dict:
    """A rank-1 LoRA adapter on the output head of ``base`` that sends 'planet' to ' the'
    instead of ' word' (or a random one for a model ``hidden`` wide, which does not fit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if hidden is None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(base)
        config.hidden_size, config.intermediate_size = hidden, 2 * hidden
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"], init_lora_weights=False)
    peft = get_peft_model(model, lora)
    if hidden is None:
        planet, the = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids(["planet", "Ġthe"])
        embed = model.get_input_embeddings().weight
        with torch.no_grad():
            peft.base_model.model.lm_head.lora_A.default.weight.copy_(
                embed[planet] / embed[planet].norm()
            )
            head_b = peft.base_model.model.lm_head.lora_B.default.weight
            head_b.zero_()
            head_b[the] = 30.0
    peft.save_pretrained(save_dir)
    state = peft.state_dict()
    return {p: v for k, v in state.items() for p in k.split(".") if p.startswith("lora_")}


def test_adapter_is_applied_and_4bit_and_8bit_load(capsys, monkeypatch, tmp_path, chain_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = str(tmp_path / "adapter")
    weights = _lora_on_head(chain_model, adapter)
    prompt = QWEN["user"].format("Reverse the word.")
    args = ["--prompt-template", "qwen_chat", "--temperature", "0", "--max-new-tokens", "6"]
    answer = _chat(
        capsys, monkeypatch, chain_model, "--adapter", adapter, *args, stdin="Reverse the word."
    )

    # Reference: the head with W + B A (alpha / r = 1) merged by hand, greedy decoding by hand.
    tokenizer = AutoTokenizer.from_pretrained(chain_model)
    model = AutoModelForCausalLM.from_pretrained(chain_model, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight += weights["lora_B"] @ weights["lora_A"]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        new: list[int] = []
        stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
        while len(new) < 6 and stop not in new[-1:]:
            logits = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits
            new.append(int(logits[0, -1].argmax()))
    assert answer["new_tokens"] == len(new)
    assert answer["answer"] == tokenizer.decode(new).removesuffix("<|im_end|>").strip()
    assert answer["answer"] == "planet the the the the the"  # the adapter's planted change

    # 4-bit (bitsandbytes, CPU): the head stays unquantised and the zeroed projections stay
    # zero, so the planted chain survives quantisation exactly.
    answer = _chat(
        capsys, monkeypatch, chain_model, "--bits", "4", *args, stdin="Reverse the word."
    )
    assert "14 linear layers in 4-bit" in answer["stderr"]
    assert answer["answer"] == ANSWER
    answer = _chat(
        capsys, monkeypatch, chain_model, "--bits", "8", *args, stdin="Reverse the word."
    )
    assert "14 linear layers in 8-bit" in answer["stderr"]
    assert answer["answer"] == ANSWER


def _error_of(capsys, *argv: str) -> str:
    assert chat.main(list(argv)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # One paragraph, the last thing printed (after any loading progress bars).
    err = err.strip().splitlines()[-1]
    assert err.startswith("xtuner chat: error:"), err
    return err


def test_bad_input_gets_one_paragraph_and_exit_status_1(capsys, tmp_path, chain_model):
    err = _error_of(capsys, str(tmp_path / "missing"), "--prompts", "-")
    assert "missing: no such folder" in err and "pth_to_hf" in err
    err = _error_of(capsys, chain_model, "--prompt-template", "qwen_chatt", "--prompts", "-")
    assert "'qwen_chatt' is not a known template" in err and "Did you mean 'qwen_chat'" in err
    other = str(tmp_path / "other_adapter")
    _lora_on_head(chain_model, other, hidden=32)
    err = _error_of(capsys, chain_model, "--adapter", other, "--prompts", "-")
    assert f"adapter {other} does not fit the model {chain_model}: size mismatch" in err
    err = _error_of(capsys, chain_model, "--lagent")
    assert "--lagent" in err and "not supported" in err
    err = _error_of(capsys, chain_model, "--with-plugins", "calculate", "solve")
    assert "--with-plugins" in err and "not supported" in err
    prompts = tmp_path / "bad.txt"
    prompts.write_text('hello\n{"text": "no input"}\n')
    err = _error_of(capsys, chain_model, "--prompts", str(prompts), "--temperature", "0")
    assert "line 2" in err and "'input'" in err


def test_module_imports_nothing_heavy_at_top_level():
    # `xtuner chat -h` must not import torch or transformers: every heavy import of the tool
    # lives inside the functions that run after the arguments are parsed.
    with open(chat.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module)
    light = {"__future__", "argparse", "contextlib", "difflib", "json", "os.path", "sys"}
    light |= {"dataclasses"}
    assert top <= light | {"typing", "xtuner.tools.utils"}, top
    assert "--prompt-template" in chat.build_parser().format_help()


def tiny_llava(tmp_path, demo_assets, llm_lora: bool = True):
    """A random tiny LLaVA (demo LLM, with LoRA unless told not, tiny CLIP) saved in the
    xtuner format.

    Returns:
        ``(llava_dir, clip_dir, model)``.
    """
    from transformers import AutoModelForCausalLM

    from xtuner.demo.llava import build_tiny_clip
    from xtuner.model import LLaVAModel

    clip = str(tmp_path / "clip")
    build_tiny_clip(clip)
    torch.manual_seed(0)
    lora = dict(type="peft.LoraConfig", r=4, lora_alpha=8, init_lora_weights=False)
    llm = dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=demo_assets["model"],
        dtype=torch.float32,
    )
    encoder = dict(
        type="transformers.CLIPVisionModel.from_pretrained", pretrained_model_name_or_path=clip
    )
    model = LLaVAModel(
        llm=llm,
        visual_encoder=encoder,
        freeze_llm=not llm_lora,
        freeze_visual_encoder=True,
        llm_lora=lora if llm_lora else None,
        use_activation_checkpointing=False,
    ).eval()
    llava = str(tmp_path / "llava")
    model.to_hf(None, llava, fp32=True, save_format="xtuner")
    return llava, clip, model


def test_llava_folder_answers_about_the_image(capsys, monkeypatch, tmp_path, demo_assets):
    from transformers import AutoTokenizer, CLIPImageProcessor

    from xtuner.demo.llava import draw_shape
    from xtuner.utils import IMAGE_TOKEN_INDEX

    llava, clip, model = tiny_llava(tmp_path, demo_assets)
    draw_shape("green", "circle", (32, 32)).save(tmp_path / "green.png")

    args = [demo_assets["model"], "--llava", llava, "--visual-encoder", clip]
    args += ["--image", str(tmp_path / "green.png"), "--temperature", "0", "--max-new-tokens", "3"]
    answer = _chat(capsys, monkeypatch, *args, stdin="What is it?")
    assert answer["prompt"] == "<s><image>\nWhat is it?"

    # Reference: the training model's own forward, greedy, three tokens.
    tokenizer = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    processor = CLIPImageProcessor.from_pretrained(clip)
    pixel_values = processor.preprocess(
        draw_shape("green", "circle", (32, 32)), return_tensors="pt"
    )
    ids = [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    ids += tokenizer.encode("\nWhat is it?", add_special_tokens=False)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            data = {
                "input_ids": torch.tensor([ids + new]),
                "pixel_values": pixel_values["pixel_values"],
            }
            logits = model(data, mode="predict")[0]["logits"]
            new.append(int(logits[-1].argmax()))
    assert answer["new_tokens"] == 3
    assert answer["answer"] == tokenizer.decode(new).strip()


def test_sampling_options_reach_generation(capsys, monkeypatch, chain_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

    base = ["--prompt-template", "qwen_chat", "--max-new-tokens", "8"]
    stdin = "Reverse the word.\n"

    # --system-template: the named system text, in the template's system slot.
    answer = _chat(
        capsys, monkeypatch, chain_model, *base, "--temperature", "0",
        "--system-template", "alpaca", stdin=stdin,
    )  # fmt: skip
    system = PROMPT_TEMPLATE.qwen_chat.SYSTEM.format(system=SYSTEM_TEMPLATE.alpaca)
    assert answer["prompt"] == "<s>" + system + QWEN["user"].format("Reverse the word.")

    # --top-k 1 leaves one candidate: sampling at any temperature is the greedy chain.
    answer = _chat(
        capsys, monkeypatch, chain_model, *base, "--temperature", "5", "--top-k", "1", stdin=stdin
    )
    assert answer["answer"] == ANSWER

    # Hot sampling over the whole vocabulary: --seed makes it repeat, another seed differs.
    hot = [*base, "--temperature", "20", "--top-k", "0", "--top-p", "1.0", "--stop-words", "#"]
    runs = [
        _chat(capsys, monkeypatch, chain_model, *hot, "--seed", seed, stdin=stdin)["answer"]
        for seed in ("3", "3", "4")
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2], runs

    # --repetition-penalty: ' the' after ' the' is penalised; the reference is the model's own
    # generate with the same penalty (greedy).
    args = ["--temperature", "0", "--max-new-tokens", "6", "--repetition-penalty", "50"]
    answer = _chat(capsys, monkeypatch, chain_model, *args, stdin="say the\n")
    tokenizer = AutoTokenizer.from_pretrained(chain_model)
    model = AutoModelForCausalLM.from_pretrained(chain_model, dtype=torch.float32)
    ids = tokenizer("say the", return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=6, do_sample=False, repetition_penalty=50.0, pad_token_id=0
    )
    expected = tokenizer.decode(out[0, ids.shape[1] :])
    assert answer["answer"] == expected.strip()
    assert answer["answer"].count("the") < 6  # without the penalty: ' the' six times


def test_no_streamer_prints_each_reply_whole(capsys, monkeypatch, chain_model):
    import transformers

    def no_streaming(*args, **kwargs):
        raise AssertionError("--no-streamer built a TextStreamer")

    monkeypatch.setattr(transformers, "TextStreamer", no_streaming)
    monkeypatch.setattr(sys, "stdin", io.StringIO("say the\n\nRESET\nsay the\n\nEXIT\n"))
    argv = [chain_model, "--no-streamer", "--temperature", "0", "--max-new-tokens", "3"]
    assert chat.main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert out.count("the the the\n") == 2 and "(new conversation)" in out, out
