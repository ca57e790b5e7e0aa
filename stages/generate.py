"""Try the model: answer prompts with one base and any number of adapters, streaming tokens.

python -m stages.generate "What does \\`sorted([3, 1, 2])\\` return?"
python -m stages.generate --adapter pyqa=models/adapter --adapter r4=sweeps/x/lora.r=4/adapter \\
    --use pyqa,r4,base --prompts questions.txt --out answers.jsonl
python -m stages.generate -i          # interactive: /use NAME[,NAME...] switches, /quit ends

Not a DVC stage and not a Hydra app: prompts are free text, and Hydra's override grammar would
parse their `=`, commas, quotes and brackets (a Python question is often all four); adapters
are repeatable NAME=PATH pairs. So argparse, with `paths.base` / `paths.adapter` from
params.yaml as defaults. The base is loaded once; every adapter shares it (lorapipe.inference).
Every model, the base too, answers with params.yaml's `format.system_prompt` (as in evaluate, so
`--use adapter,base` shows what reports/predictions.jsonl measured) unless --system-prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from lorapipe.config import ConfigError
from lorapipe.errors import PipelineError, exit_with
from lorapipe.inference import (
    BASE,
    Assistant,
    InferenceError,
    check_adapter,
    parse_adapter,
    read_prompts,
    trained_system_prompt,
)
from lorapipe.io import write_jsonl
from lorapipe.params import PARAMS_FILE, load_params
from lorapipe.runtime import leave_out_bitsandbytes, saved_quantised

NAME = "generate"
MODULE = f"stages.{NAME}"


def project_defaults() -> dict[str, Any]:
    """paths.base and paths.adapter from ./params.yaml, or the pipeline's defaults without one;
    and its format.system_prompt, when it has one (`system_prompt` absent otherwise). Raises
    ConfigError when params.yaml is not YAML or has no paths section."""
    root = Path.cwd()
    params = load_params(root) if (root / PARAMS_FILE).is_file() else {"paths": {}}
    paths = params.get("paths")
    if not isinstance(paths, dict):
        raise ConfigError(
            f"{PARAMS_FILE}: no paths section (generate reads paths.base and paths.adapter "
            "there); `make params` recomposes it from conf/, or give --base and --adapter"
        )
    found: dict[str, Any] = {
        "base": paths.get("base", "models/base"),
        "adapter": paths.get("adapter", "models/adapter"),
    }
    if isinstance(params.get("format"), dict) and "system_prompt" in params["format"]:
        found["system_prompt"] = params["format"]["system_prompt"]
    return found


def system_prompt(
    args: argparse.Namespace, defaults: dict[str, Any], adapters: dict[str, Path]
) -> str | None:
    """Every model's system prompt: --system-prompt, else params.yaml's format.system_prompt
    (the one evaluate gave every model, base included, so the answers are those the report
    measured), else (no params.yaml) the first adapter's trained one. An adapter trained with
    another gets a note on stderr."""
    trained = {name: trained_system_prompt(path) for name, path in adapters.items()}
    if args.system_prompt is not None:
        chosen = args.system_prompt
    elif "system_prompt" in defaults:
        chosen = defaults["system_prompt"]
    else:
        chosen = next((p for p in trained.values() if p is not None), None)
    for name, prompt in trained.items():
        if prompt is not None and prompt != chosen:
            print(
                f"{NAME}: note: adapter {name!r} was trained with the system prompt {prompt!r}; "
                f"every model answers with {chosen!r}",
                file=sys.stderr,
            )
    return chosen


def _number(kind: type, low: float, high: float | None = None) -> Any:
    """An argparse type: a `kind` number above `low` (and at most `high`)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= low or (high is not None and value > high):
            bound = f"in ({low}, {high}]" if high is not None else f"> {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stages.generate", description=__doc__.split("\n")[0]
    )
    p.add_argument("prompt", nargs="?", help="one instruction to answer")
    p.add_argument(
        "--prompts",
        type=Path,
        help="a file of prompts: .jsonl rows with "
        "'instruction' or 'messages', else one instruction per line",
    )
    p.add_argument("-i", "--interactive", action="store_true", help="answer lines from stdin")
    p.add_argument("--base", type=Path, help="base model folder (default: paths.base)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter to load (repeatable; default: adapter=<paths.adapter>)",
    )
    p.add_argument(
        "--use",
        help="comma-separated adapter names to answer with, 'base' for no "
        "adapter (default: every loaded adapter)",
    )
    p.add_argument("--out", type=Path, help="also write {adapter, messages, answer} as JSONL")
    p.add_argument(
        "--system-prompt",
        help="every model's system prompt (default: format.system_prompt in params.yaml, as "
        "evaluate gives every model)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=_number(int, 0), default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_number(float, 0), default=1.0)
    p.add_argument("--top-p", type=_number(float, 0, 1), default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


class Answers:
    """The answers given so far; with a path, each is saved as it comes (the whole file rewritten
    atomically), so an interrupt or a crash loses none of them and leaves no half a file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def check(self) -> None:
        """Raise PipelineError unless the answers can be written to the path: checked before
        any model loads, so no answer is generated to be lost."""
        if self.path is None:
            return
        if self.path.is_dir():
            example = self.path / "answers.jsonl"
            raise PipelineError(f"--out {self.path}: is a folder; give a file, e.g. {example}")
        folder = next(p for p in self.path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise PipelineError(f"--out {self.path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PipelineError(f"--out {self.path}: cannot write in {folder}")

    def add(self, name: str, messages: list[dict[str, str]], answer: str) -> None:
        self.rows.append({"adapter": name, "messages": messages, "answer": answer})
        if self.path is not None:
            try:
                write_jsonl(self.path, self.rows)
            except OSError as e:
                raise PipelineError(
                    f"--out {self.path}: cannot write ({e.strerror}); the answers are above"
                ) from None


def answer_all(
    assistant: Assistant,
    messages: list[dict[str, str]],
    names: list[str],
    out: TextIO,
    answers: Answers,
    **kwargs: Any,
) -> None:
    """Each of `names` answers the conversation in turn, its answer streamed after `[NAME] `."""
    for name in names:
        out.write(f"[{name}] ")
        answers.add(name, messages, assistant.answer(messages, name, stream=out, **kwargs))


def too_long(
    assistant: Assistant,
    messages: list[dict[str, str]],
    names: list[str],
    max_new_tokens: int,
    what: str,
) -> None:
    """Raise PipelineError when the prompt (as any of `names` gets it) and `max_new_tokens` do
    not fit in the model's context: past it the model answers nothing or garbage."""
    context = assistant.context
    tokens = max(assistant.prompt_tokens(messages, name) for name in names)
    if context is not None and tokens + max_new_tokens > context:
        raise PipelineError(
            f"{what} is {tokens:,} tokens; the model's context is {context:,} "
            f"(with --max-new-tokens {max_new_tokens})"
        )


def interactive(
    assistant: Assistant, names: list[str], out: TextIO, answers: Answers, **kwargs: Any
) -> None:
    """Answer stdin lines one by one, each with every name in `names`; `/use NAME[,NAME...]`
    switches, `/use` alone shows the names answering, `/quit` (or EOF) ends."""
    loaded = ", ".join(assistant.names)
    out.write(f"adapters: {loaded}; /use NAME[,NAME...] to switch, /quit to end\n")
    while True:
        out.write(f"[{','.join(names)}]> ")
        out.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        line = line.strip()
        if line.split(" ", 1)[0] == "/use":
            wanted = [n.strip() for n in line.removeprefix("/use").split(",") if n.strip()]
            unknown = [n for n in wanted if n not in assistant.names]
            if not wanted:
                out.write(f"answering with {', '.join(names)}; /use NAME[,NAME...] ({loaded})\n")
            elif unknown:
                out.write(f"unknown adapter {', '.join(map(repr, unknown))}; loaded: {loaded}\n")
            else:
                names = wanted
        elif line:
            messages = [{"role": "user", "content": line}]
            try:
                too_long(assistant, messages, names, kwargs["max_new_tokens"], "this prompt")
            except PipelineError as e:
                out.write(f"{e}\n")
                continue
            answer_all(assistant, messages, names, out, answers, **kwargs)


def chosen(args: argparse.Namespace, defaults: dict[str, Any]) -> tuple[dict[str, Path], list[str]]:
    """The adapters to load (NAME -> folder) and the names that answer (--use). Without
    --adapter, paths.adapter is loaded as `adapter` only when it answers: `--use base` needs no
    trained adapter."""
    specs = args.adapter or [f"adapter={defaults['adapter']}"]
    adapters = dict(parse_adapter(s) for s in specs)
    if len(adapters) != len(specs):
        raise PipelineError("--adapter: each NAME must be given once")
    use = args.use.split(",") if args.use else list(adapters)
    for name in use:
        if name != BASE and name not in adapters:
            names = ", ".join([*adapters, BASE])
            raise PipelineError(f"--use {name!r}: not a loaded adapter or {BASE} (use {names})")
    if not args.adapter:
        adapters = {name: path for name, path in adapters.items() if name in use}
        for path in adapters.values():
            if not (path / "adapter_config.json").is_file():
                raise PipelineError(
                    f"{path}: no trained adapter; train it first (`dvc repro train`), or answer "
                    "with the base alone (--use base)"
                )
    return adapters, use


def prompts(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    """The conversations to answer: the prompt, or those in the --prompts file."""
    if args.prompts is None:
        if args.prompt is None:
            return []
        if not args.prompt.strip():
            raise PipelineError("empty prompt: give the instruction to answer")
        return [[{"role": "user", "content": args.prompt}]]
    try:
        conversations = read_prompts(args.prompts)
    except InferenceError as e:
        raise InferenceError(f"--prompts {e}") from None
    if not conversations:
        raise PipelineError(f"--prompts {args.prompts}: no prompts in it (only blank lines)")
    return conversations


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    answers = Answers(args.out)
    try:
        if [args.prompt is not None, args.prompts is not None, args.interactive].count(True) != 1:
            raise PipelineError("give exactly one of: a prompt, --prompts FILE, --interactive")
        defaults = project_defaults()
        adapters, use = chosen(args, defaults)
        answers.check()
        conversations = prompts(args)
        for name, path in adapters.items():
            check_adapter(name, path)
        base = Path(args.base or defaults["base"])
        if not saved_quantised(base):  # loaded unquantised: bitsandbytes has no part in it
            leave_out_bitsandbytes(MODULE)
        assistant = Assistant(
            base,
            adapters,
            dtype=args.dtype,
            system_prompt=system_prompt(args, defaults, adapters),
        )
        kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
        if args.sample:
            kwargs.update(
                do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed
            )
        if args.interactive:
            interactive(assistant, use, sys.stdout, answers, **kwargs)
        else:
            where = f"--prompts {args.prompts}: " if args.prompts else ""
            for i, messages in enumerate(conversations, start=1):
                too_long(assistant, messages, use, args.max_new_tokens, f"{where}prompt {i}")
            for messages in conversations:
                answer_all(assistant, messages, use, sys.stdout, answers, **kwargs)
    except (PipelineError, FileNotFoundError, ValueError) as exc:
        print(f"{NAME}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = ""
        if args.out:
            n = len(answers.rows)
            kept = f"; the {n} answers given are in {args.out}" if n else f"; {args.out} untouched"
        print(f"\n{NAME}: interrupted{kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    exit_with(main)
