"""``xtuner chat MODEL``: talk to a trained model in the terminal, or answer prompts in bulk.

MODEL is a local Hugging Face model folder (e.g. ``xtuner convert pth_to_hf`` or
``HFCheckpointHook`` output). Interactively, the reply streams to the terminal and every turn
sees the earlier ones (type RESET to start over, EXIT to quit; an empty line sends a
multi-line message). With ``--prompts FILE`` (``-`` for stdin) each line is a user turn (plain
text, or a JSON object ``{"input": ..., "image": ..., "new_conversation": true}``) and one JSON
line per answer is written to ``--output`` (default stdout). Prompts are encoded exactly as
training encodes them (``template_map_fn`` and ``encode_fn``), history included.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os.path as osp
import sys
from dataclasses import dataclass, field
from typing import Any

from xtuner.tools.utils import UserError, run_tool

PROG = "xtuner chat"
EXIT, RESET = "EXIT", "RESET"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="the language model: a local HF model folder")
    parser.add_argument("--adapter", help="a LoRA adapter folder (pth_to_hf output) to apply")
    parser.add_argument(
        "--llava",
        help="a LLaVA folder of 'xtuner convert pth_to_hf' (projector, llm_adapter, ...)",
    )
    parser.add_argument("--visual-encoder", help="the vision encoder folder (with --llava)")
    parser.add_argument("--visual-select-layer", type=int, default=-2)
    parser.add_argument("--image", help="an image file the conversation is about (with --llava)")
    parser.add_argument(
        "--prompt-template",
        default=None,
        help="a PROMPT_TEMPLATE name, e.g. qwen_chat (default: the raw text, no template)",
    )
    system = parser.add_mutually_exclusive_group()
    system.add_argument("--system", help="the system prompt")
    system.add_argument("--system-template", help="a SYSTEM_TEMPLATE name, e.g. alpaca")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="load the LLM quantised")
    parser.add_argument("--torch-dtype", default="auto", help="fp32, bf16, fp16 or auto")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.1, help="0 means greedy decoding")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument(
        "--stop-words", nargs="+", default=[], help="more stop words (the template's are used)"
    )
    parser.add_argument("--no-streamer", action="store_true", help="print each reply at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", help="answer the prompts of this file ('-': stdin)")
    parser.add_argument("--output", help="JSON lines of the answers (default stdout)")
    # XTuner 0.x agent options: refused with an explanation rather than ignored.
    parser.add_argument("--lagent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-plugins", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--no-history", action="store_true", help=argparse.SUPPRESS)
    return parser


@dataclass
class Turn:
    text: str
    image: str | None = None
    new_conversation: bool = False


@dataclass
class Session:
    """The model, how prompts are built, and the conversation so far."""

    llm: Any
    tokenizer: Any
    template: dict | None
    system: str
    stop_words: list[str]
    config: Any
    llava: Any = None
    image_processor: Any = None
    history: list[dict] = field(default_factory=list)
    pixel_values: Any = None
    #: InternVL: how an image becomes tiles and tokens (``InternVLImageTokens``).
    image_tokens: Any = None

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids the model sees for the next turn: the history and the new input,
        encoded as training encodes a conversation."""
        from xtuner.dataset.map_fns import template_map_fn
        from xtuner.dataset.utils import encode_fn

        turns = [*self.history, {"input": text, "output": ""}]
        if self.system:
            turns[0] = {**turns[0], "system": self.system}
        if self.template is None:
            turns = [{**t, "need_eos_token": True, "sep": ""} for t in turns]
        else:
            turns = template_map_fn({"conversation": turns}, self.template)["conversation"]
        images = self.llava is not None
        past = encode_fn({"conversation": turns[:-1]}, self.tokenizer, None, True, images)
        # The new turn without its (empty) answer, EOS and separator.
        current = {"conversation": [{**turns[-1], "sep": ""}]}
        ids = encode_fn(current, self.tokenizer, None, False, images)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if turns[:-1] and not turns[-2]["need_eos_token"] and bos is not None and ids[:1] == [bos]:
            ids = ids[1:]  # training puts BOS only after an EOS
        return past["input_ids"] + ids

    def answer(self, turn: Turn, streamer=None) -> dict:
        import torch

        from xtuner.engine.hooks.evaluate_chat_hook import generate_reply
        from xtuner.utils import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

        if turn.new_conversation:
            self.reset()
        text = turn.text
        if self.llava is not None:
            if turn.image is not None:
                self.set_image(turn.image)
            first_turn = self.pixel_values is not None and not self.history
            if first_turn and DEFAULT_IMAGE_TOKEN not in text:
                text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
        ids = self.prompt_ids(text)
        device = next(self.llm.parameters()).device
        model_ids = ids
        if self.image_tokens is not None and IMAGE_TOKEN_INDEX in ids:
            # InternVL: the image stands in the text as its tile tokens.
            model_ids = self.image_tokens.expand(ids, ids, self.pixel_values)[0]
        input_ids = torch.tensor([model_ids], device=device)
        if IMAGE_TOKEN_INDEX in ids:
            data = {"input_ids": input_ids, "pixel_values": self.pixel_values}
            prepared, _ = self.llava.prepare_inputs(data)
            inputs = {k: prepared[k] for k in ("inputs_embeds", "attention_mask")}
        else:
            inputs = {"input_ids": input_ids}
        with torch.no_grad():
            new_ids = generate_reply(
                self.llm, self.tokenizer, inputs, self.config, self.stop_words, streamer
            )
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=False)
        reply, stopped_by = self._strip_stop(new_ids, raw)
        self.history.append({"input": text, "output": reply})
        shown = [i if i != IMAGE_TOKEN_INDEX else None for i in ids]
        prompt = DEFAULT_IMAGE_TOKEN.join(
            self.tokenizer.decode(part, skip_special_tokens=False) for part in _split(shown)
        )
        return {
            "turn": len(self.history),
            "input": turn.text,
            "prompt": prompt,
            "answer": reply,
            "stopped_by": stopped_by,
            "new_tokens": len(new_ids),
        }

    def _strip_stop(self, new_ids: list[int], raw: str) -> tuple[str, str]:
        """The reply without what ended it, and what ended it."""
        eos = self.tokenizer.eos_token
        text = raw.rstrip()
        for word in [*self.stop_words, *([eos] if eos else [])]:
            if word and text.endswith(word):
                return text[: -len(word)].strip(), word
        return raw.strip(), "max_new_tokens"

    def set_image(self, path: str) -> None:
        from xtuner.engine.hooks.evaluate_chat_hook import load_image

        if not osp.isfile(path):
            raise UserError(f"--image {path}: no such file")
        device = next(self.llm.parameters()).device
        dtype = self.llava.vision_parameters()[0].dtype
        if self.image_tokens is not None:
            from PIL import Image

            with Image.open(path) as image:
                tiles = self.image_tokens.tiler(image.convert("RGB"))
            self.pixel_values = [tiles.to(device, dtype)]  # one sample: its image's tiles
            return
        self.pixel_values = load_image(path, self.image_processor)[None].to(device, dtype)

    def reset(self) -> None:
        self.history = []


def _split(ids: list[int | None]) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for i in ids:
        if i is None:
            parts.append([])
        else:
            parts[-1].append(i)
    return parts


def evaluation_parser(prog: str, doc: str, data_help: str, **defaults) -> argparse.ArgumentParser:
    """The parser of a LLaVA benchmark tool: ``xtuner chat``'s model options, ``--data-path``
    and ``--work-dir`` (``defaults`` override the chat defaults, ``work_dir`` included)."""
    parser = build_parser()
    parser.prog, parser.description = prog, doc
    parser.add_argument("--data-path", required=True, help=data_help)
    parser.add_argument("--work-dir", help="results go here")
    parser.set_defaults(temperature=0.0, **defaults)
    return parser


def check_evaluation_args(args: argparse.Namespace, allow_internvl: bool = False) -> None:
    """A benchmark needs a LLaVA model (or, where ``allow_internvl``, an InternVL checkpoint
    as MODEL) and an existing data file."""
    if not args.llava and not (allow_internvl and is_internvl(args.model)):
        raise UserError(
            "--llava (a LLaVA folder) and --visual-encoder are required"
            + (", unless MODEL is an InternVL checkpoint" if allow_internvl else "")
        )
    if not osp.isfile(args.data_path):
        raise UserError(f"--data-path {args.data_path}: no such file")


def _check_args(args: argparse.Namespace) -> None:
    if args.lagent or args.with_plugins:
        raise UserError(
            "--lagent and --with-plugins (XTuner 0.x agent mode with calculate/solve/search "
            "plugins) are not supported by this fork: chat with the model directly, or serve it "
            "with an agent framework of your choice."
        )
    if args.no_history:
        raise UserError("--no-history is not supported; start each prompt with RESET instead")
    if args.image and not args.llava and not is_internvl(args.model):
        raise UserError(
            "--image needs --llava (a LLaVA folder) and --visual-encoder, or an InternVL "
            "checkpoint as MODEL"
        )
    if args.llava and not args.visual_encoder:
        raise UserError("--llava needs --visual-encoder (the vision encoder's HF folder)")
    for flag, path in (
        ("MODEL", args.model),
        ("--adapter", args.adapter),
        ("--llava", args.llava),
        ("--visual-encoder", args.visual_encoder),
    ):
        if path is not None and not osp.isdir(path):
            raise UserError(
                f"{flag} {path}: no such folder. xtuner chat loads local Hugging Face model "
                "folders (the model hub is not used); convert a training checkpoint with "
                "'xtuner convert pth_to_hf CONFIG PTH SAVE_DIR' first."
            )
    if not osp.isfile(osp.join(args.model, "config.json")):
        raise UserError(
            f"MODEL {args.model} has no config.json, so it is not a Hugging Face model folder; "
            "for a LoRA adapter give the base model as MODEL and the adapter with --adapter."
        )
    if args.adapter and not osp.isfile(osp.join(args.adapter, "adapter_config.json")):
        raise UserError(f"--adapter {args.adapter} has no adapter_config.json (a PEFT adapter)")


def _template(args: argparse.Namespace) -> tuple[dict | None, str]:
    from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

    template = None
    if args.prompt_template is not None:
        if args.prompt_template not in PROMPT_TEMPLATE:
            close = difflib.get_close_matches(args.prompt_template, list(PROMPT_TEMPLATE), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"--prompt-template {args.prompt_template!r} is not a known template.{hint} "
                f"Known: {', '.join(PROMPT_TEMPLATE)}."
            )
        template = dict(PROMPT_TEMPLATE[args.prompt_template])
    system = args.system or ""
    if args.system_template is not None:
        if args.system_template not in SYSTEM_TEMPLATE:
            raise UserError(
                f"--system-template {args.system_template!r} is not a known system template; "
                f"known: {', '.join(SYSTEM_TEMPLATE)}."
            )
        system = SYSTEM_TEMPLATE[args.system_template]
    if system and template is None:
        raise UserError("--system and --system-template need --prompt-template")
    return template, system


def _dtype(name: str):
    import torch

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return "auto"
    if name not in names:
        raise UserError(f"--torch-dtype {name!r}: use one of auto, {', '.join(names)}")
    return names[name]


def load_llm(args: argparse.Namespace):
    """The tokenizer and the language model (quantised, with its adapter) of the arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = args.model
    if args.llava and osp.isfile(osp.join(args.llava, "config.json")):
        source = args.llava  # full fine-tuning saved the LLM itself in the LLaVA folder
    tokenizer_dir = source if osp.isfile(osp.join(source, "tokenizer_config.json")) else args.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    kwargs: dict[str, Any] = {"dtype": _dtype(args.torch_dtype), "trust_remote_code": True}
    if args.bits == 4:
        import torch

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if not _has_cuda() else torch.bfloat16,
        )
    elif args.bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if _has_cuda() and args.bits is None:
        kwargs["device_map"] = "auto"
    llm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    adapters = [args.adapter] if args.adapter else []
    if args.llava and osp.isdir(osp.join(args.llava, "llm_adapter")):
        adapters.append(osp.join(args.llava, "llm_adapter"))
    for adapter in adapters:
        llm = _with_adapter(llm, adapter, source)
    quantized = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in llm.modules())
    detail = f", {quantized} linear layers in {args.bits}-bit" if args.bits else ""
    names = ", ".join([source, *(f"adapter {a}" for a in adapters)])
    print(f"{PROG}: loaded {names}{detail}", file=sys.stderr)
    return tokenizer, llm.eval()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _with_adapter(llm, adapter: str, base: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(llm, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # PEFT's first line only says that loading failed; the size mismatch says why.
        reason = next((line for line in lines if "size mismatch" in line), None)
        reason = (reason or (lines[0] if lines else type(exc).__name__)).rstrip(".")
        raise UserError(
            f"adapter {adapter} does not fit the model {base}: {reason[:300]}. Give the base "
            "model the adapter was trained on (its adapter_config.json names it as "
            "base_model_name_or_path)."
        ) from exc


def load_llava(args: argparse.Namespace, llm):
    """The LLaVA wrapper (vision encoder + projector around ``llm``) and its image processor."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    from xtuner.model import LLaVAModel
    from xtuner.model.modules.projector import ProjectorModel

    projector_dir = osp.join(args.llava, "projector")
    if not osp.isdir(projector_dir):
        raise UserError(
            f"--llava {args.llava} has no projector/ folder; give the folder that "
            "'xtuner convert pth_to_hf' wrote for a LLaVA config (save format xtuner)"
        )
    encoder_dir = osp.join(args.llava, "visual_encoder")
    if not osp.isdir(encoder_dir):
        encoder_dir = args.visual_encoder
    visual_encoder = CLIPVisionModel.from_pretrained(encoder_dir)
    encoder_adapter = osp.join(args.llava, "visual_encoder_adapter")
    if osp.isdir(encoder_adapter):
        visual_encoder = _with_adapter(visual_encoder, encoder_adapter, encoder_dir)
    projector = ProjectorModel.from_pretrained(projector_dir)
    model = LLaVAModel(
        llm=llm,
        visual_encoder=visual_encoder,
        freeze_llm=True,
        freeze_visual_encoder=True,
        visual_select_layer=args.visual_select_layer,
        projector_depth=projector.config.depth,
        use_activation_checkpointing=False,
    )
    model.projector = projector.to(next(visual_encoder.parameters()).dtype)
    llm.config.use_cache = True  # the training wrapper switched it off
    processor = AutoImageProcessor.from_pretrained(
        encoder_dir
        if osp.isfile(osp.join(encoder_dir, "preprocessor_config.json"))
        else args.visual_encoder
    )
    return model.eval(), processor


def is_internvl(path: str) -> bool:
    """Whether ``path`` is an InternVL checkpoint in transformers' layout (image and text in
    one model: no ``--llava`` needed)."""
    import json

    config = osp.join(str(path), "config.json")
    if not osp.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "internvl"


def load_internvl(args: argparse.Namespace):
    """The tokenizer, the ``InternVL_V1_5`` wrapper (its ``llm`` generates) and its image
    tokens, for an InternVL checkpoint given as the model."""
    from transformers import AutoTokenizer

    from xtuner.dataset.internvl_dataset import InternVLImageTokens
    from xtuner.model import InternVL_V1_5

    if args.llava or args.adapter or args.bits:
        raise UserError(
            f"{args.model} is an InternVL checkpoint (vision and language in one model): "
            "--llava, --adapter and --bits do not apply; export the trained model with "
            "'xtuner convert pth_to_hf' and give that folder as the model"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = InternVL_V1_5(
        args.model,
        freeze_llm=True,
        freeze_visual_encoder=True,
        dtype=_dtype(args.torch_dtype),
        use_activation_checkpointing=False,
    )
    model.llm.config.use_cache = True  # the training wrapper switched it off
    if _has_cuda():
        model.cuda()
    print(f"{PROG}: loaded InternVL {args.model}", file=sys.stderr)
    return tokenizer, model.eval(), InternVLImageTokens(args.model, tokenizer)


def build_session(args: argparse.Namespace) -> Session:
    from transformers import set_seed

    from xtuner.engine.hooks.evaluate_chat_hook import generation_config

    template, system = _template(args)
    set_seed(args.seed)
    llava, processor, image_tokens = (None, None, None)
    if is_internvl(args.model):
        tokenizer, llava, image_tokens = load_internvl(args)
        llm = llava.llm
    else:
        tokenizer, llm = load_llm(args)
    if args.llava:
        llava, processor = load_llava(args, llm)
        llava.to(next(llm.parameters()).device)
    stop_words = list(template.get("STOP_WORDS", []) if template else []) + args.stop_words
    sampling = args.temperature > 0
    kwargs = dict(do_sample=sampling, repetition_penalty=args.repetition_penalty)
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    config = generation_config(tokenizer, args.max_new_tokens, **kwargs)
    # Stop words that are one token also end generation as EOS does (no decoding needed).
    vocab = tokenizer.get_vocab()
    eos = [config.eos_token_id] if config.eos_token_id is not None else []
    config.eos_token_id = eos + [vocab[w] for w in stop_words if w in vocab]
    session = Session(llm, tokenizer, template, system, stop_words, config, llava, processor)
    session.image_tokens = image_tokens
    if args.image:
        session.set_image(args.image)
    return session


def read_turns(path: str) -> list[Turn]:
    """The user turns of a prompts file (plain lines, or JSON objects with ``input``)."""
    if path == "-":
        text = sys.stdin.read()
    elif osp.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        raise UserError(f"--prompts {path}: no such file")
    turns = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            turns.append(Turn(line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--prompts {path} line {number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record.get("input"), str):
            raise UserError(
                f"--prompts {path} line {number}: a JSON prompt needs a string 'input' field"
            )
        turns.append(
            Turn(record["input"], record.get("image"), bool(record.get("new_conversation")))
        )
    return turns


def answer_file(session: Session, args: argparse.Namespace) -> int:
    turns = read_turns(args.prompts)
    with contextlib.ExitStack() as stack:
        out = sys.stdout
        if args.output:
            out = stack.enter_context(open(args.output, "w", encoding="utf-8"))
        for turn in turns:
            out.write(json.dumps(session.answer(turn), ensure_ascii=False) + "\n")
            out.flush()
    return 0


def _read_message() -> str | None:
    """One user message from the terminal: lines up to an empty line (None at end of input)."""
    lines: list[str] = []
    prompt = "\n>>> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.strip() in (EXIT, RESET) and not lines:
            return line.strip()
        if not line and lines:
            return "\n".join(lines)
        if line:
            lines.append(line)
        prompt = "... "


def interactive(session: Session, args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    print(
        f"Chatting with {args.model}. End a message with an empty line; {RESET} starts a new "
        f"conversation, {EXIT} (or Ctrl-D) quits."
    )
    while True:
        message = _read_message()
        if message is None or message == EXIT:
            return 0
        if message == RESET:
            session.reset()
            print("(new conversation)")
            continue
        streamer = None
        if not args.no_streamer:
            streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = session.answer(Turn(message), streamer)
        if streamer is None:
            print(result["answer"], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        _check_args(args)
        session = build_session(args)
        if args.prompts is not None:
            return answer_file(session, args)
        return interactive(session, args)

    return run_tool(body, PROG)
