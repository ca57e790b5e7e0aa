"""Try the model: answer prompts with one base and any number of adapters, streaming tokens.

python -m stages.generate "What does \\`sorted([3, 1, 2])\\` return?"
python -m stages.generate --adapter pyqa=models/adapter --adapter r4=sweeps/x/lora.r=4/adapter \\
    --use pyqa,r4,base --prompts questions.txt --out answers.jsonl
python -m stages.generate -i          # interactive: /use NAME switches adapter, /quit ends

Not a DVC stage and not a Hydra app: prompts are free text, and Hydra's override grammar would
parse their `=`, commas, quotes and brackets (a Python question is often all four); adapters
are repeatable NAME=PATH pairs. So argparse, with `paths.base` / `paths.adapter` from
params.yaml as defaults. The base is loaded once; every adapter shares it (lorapipe.inference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from lorapipe.config import ConfigError
from lorapipe.errors import PipelineError
from lorapipe.inference import BASE, Assistant, parse_adapter, read_prompts
from lorapipe.io import write_jsonl
from lorapipe.params import PARAMS_FILE, load_params

NAME = "generate"


def default_paths() -> dict[str, str]:
    """paths.base and paths.adapter from ./params.yaml, or the pipeline's defaults without one.
    Raises ConfigError when params.yaml is not YAML or has no paths section."""
    root = Path.cwd()
    paths = load_params(root).get("paths") if (root / PARAMS_FILE).is_file() else {}
    if not isinstance(paths, dict):
        raise ConfigError(
            f"{PARAMS_FILE}: no paths section (generate reads paths.base and paths.adapter "
            "there); `make params` recomposes it from conf/, or give --base and --adapter"
        )
    return {
        "base": paths.get("base", "models/base"),
        "adapter": paths.get("adapter", "models/adapter"),
    }


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
    p.add_argument("--system-prompt", help="override the system prompt the adapters trained with")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=_number(int, 0), default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_number(float, 0), default=1.0)
    p.add_argument("--top-p", type=_number(float, 0, 1), default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


def interactive(
    assistant: Assistant, name: str, out: TextIO, **kwargs: Any
) -> list[dict[str, Any]]:
    """Answer stdin lines one by one; `/use NAME` switches adapter, `/quit` (or EOF) ends."""
    rows: list[dict[str, Any]] = []
    out.write(f"adapters: {', '.join(assistant.names)}; /use NAME to switch, /quit to end\n")
    while True:
        out.write(f"[{name}]> ")
        out.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return rows
        line = line.strip()
        if line.startswith("/use "):
            wanted = line.removeprefix("/use ").strip()
            if wanted in assistant.names:
                name = wanted
            else:
                out.write(f"unknown adapter {wanted!r}; loaded: {', '.join(assistant.names)}\n")
        elif line:
            messages = [{"role": "user", "content": line}]
            answer = assistant.answer(messages, name, stream=out, **kwargs)
            rows.append({"adapter": name, "messages": messages, "answer": answer})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if [args.prompt is not None, args.prompts is not None, args.interactive].count(True) != 1:
            raise PipelineError("give exactly one of: a prompt, --prompts FILE, --interactive")
        defaults = default_paths()
        specs = args.adapter or [f"adapter={defaults['adapter']}"]
        adapters = dict(parse_adapter(s) for s in specs)
        if len(adapters) != len(specs):
            raise PipelineError("--adapter: each NAME must be given once")
        use = args.use.split(",") if args.use else list(adapters)
        for name in use:
            if name != BASE and name not in adapters:
                raise PipelineError(f"--use {name!r}: not a loaded adapter ({', '.join(adapters)})")
        conversations = (
            read_prompts(args.prompts)
            if args.prompts
            else [[{"role": "user", "content": args.prompt}]]
        )
        assistant = Assistant(
            args.base or Path(defaults["base"]),
            adapters,
            dtype=args.dtype,
            system_prompt=args.system_prompt,
        )
        kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
        if args.sample:
            kwargs.update(
                do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed
            )
        out = sys.stdout
        rows: list[dict[str, Any]] = []
        if args.interactive:
            rows = interactive(assistant, use[0], out, **kwargs)
        else:
            for messages in conversations:
                for name in use:
                    out.write(f"[{name}] ")
                    answer = assistant.answer(messages, name, stream=out, **kwargs)
                    rows.append({"adapter": name, "messages": messages, "answer": answer})
        if args.out:
            write_jsonl(args.out, rows)
    except (PipelineError, FileNotFoundError, ValueError) as exc:
        print(f"{NAME}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{NAME}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
