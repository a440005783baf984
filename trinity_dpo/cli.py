"""The `trinity` command.

    trinity run --config examples/dpo_humanlike/dpo.yaml [dotted.key=value ...]   (every stage of a `stages:` config)
    trinity eval --model RUN/global_step_N [--ref BASE] (--config dpo.yaml | --data pairs.jsonl) [--generate 3]
    trinity report RUN_DIR [RUN_DIR ...] [-o page.html]                           (several: side by side)
    trinity chat (--model CHECKPOINT | --run RUN_DIR) [--system TEXT] [--temperature T]
    trinity export (--model CHECKPOINT | --run RUN_DIR) --gguf FILE.gguf [--type f32|f16|bf16|q8_0]
    trinity models

Each subcommand parses, validates before anything heavy loads, and calls one function. Exit codes (the table in
docs/internals.md): 0 done, or stopped by SIGINT/SIGTERM after saving; 2 a problem the user must fix
(configuration, data, a run folder another run holds, a checkpoint that cannot be resumed or saved, a diverged run),
in one line; 1 a bug, with its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from .errors import ConfigError, UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trinity", description="Offline DPO from a Trinity-RFT style config.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="train offline DPO as the config says")
    run_p.add_argument("--config", required=True, help="the Trinity-style YAML (dpo.yaml)")
    run_p.add_argument("overrides", nargs="*", help="dotted key=value settings that replace the file's")
    eval_p = sub.add_parser("eval", help="held-out DPO figures of a checkpoint against its base model")
    eval_p.add_argument("--model", required=True, help="the checkpoint folder (or builtin:NAME)")
    eval_p.add_argument("--ref", help="the reference/base model (default: the config's model.model_path)")
    source = eval_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a dpo.yaml: its held-out data (or all its data), format and lengths")
    source.add_argument("--data", help="a preference file or folder with prompt/chosen/rejected")
    eval_p.add_argument("--generate", type=int, default=0, metavar="N", help="greedy answers of both models to N prompts")
    eval_p.add_argument("overrides", nargs="*", help="dotted key=value settings (with --config)")
    report_p = sub.add_parser("report", help="rebuild a run's report.html, or compare several runs on one page")
    report_p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report_p.add_argument("-o", "--out", help="the comparison page to write (several runs; default: runs.html)")
    sub.add_parser("models", help="list the built-in models and their local folders (converting on first use)")
    chat_p = sub.add_parser("chat", help="talk to a model in the terminal, through its chat template")
    which = chat_p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a checkpoint, LoRA adapter folder, model folder, hub id or builtin:NAME")
    which.add_argument("--run", help="a run folder: its newest checkpoint")
    chat_p.add_argument("--system", help="a system message to start with")
    chat_p.add_argument("--max-new-tokens", type=int, default=256)
    chat_p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy, reproducible")
    chat_p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature above 0)")
    chat_p.add_argument("--seed", type=int, default=0, help="the sampling seed (with --temperature above 0)")
    chat_p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    export_p = sub.add_parser("export", help="write a checkpoint as a GGUF file (llama.cpp, Ollama) and a Modelfile")
    source = export_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint, LoRA adapter folder, model folder, hub id or builtin:NAME")
    source.add_argument("--run", help="a run folder: its newest checkpoint")
    export_p.add_argument("--gguf", required=True, help="the file to write (FILE.gguf; FILE.Modelfile beside it)")
    # checked by export, not by argparse `choices`: a wrong value is one line like every other user error
    export_p.add_argument("--type", default="f16", help="f32, f16 (the default), bf16 or q8_0")
    return parser


def main(argv: list[str] | None = None, restart: bool = False) -> int:
    """The command; `restart`: the process is the command's own (`entry`), which `trinity run` may start again
    with tuned heap settings (`engine/host_heap.py`). Called in-process (tests) it never restarts."""
    args = _parser().parse_args(argv)
    from .engine import host_heap

    if restart and args.command == "run":  # first of all: the loader reads heap settings only when a process starts
        host_heap.restart_tuned()
    host_heap.bound_kernel_cache()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would drown the run's own lines
    try:
        text = COMMANDS[args.command](args)
        if text:
            print(text, flush=True)
    except UserError as e:
        print(f"trinity: {e.label}: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args) -> str:
    from .config.stages import Stage, load_stages
    from .engine import host_heap

    # Every stage's config is built and checked before anything runs.
    stages = load_stages(args.config, args.overrides)
    if (line := host_heap.describe()) is not None:
        logging.getLogger(__name__).info(line)
    from .engine import distributed
    from .run.stages import run_stages
    from .sources.local import localize

    # Names become local folders here, once, before any worker starts: a download or a conversion happens in one
    # process, and a missing path is one line from the command itself (the workers find them done).
    stages = [Stage(s.name, localize(s.cfg)) for s in stages]
    # Several processes: torchrun runs this command again in each worker, which runs every stage; this one waits.
    code = distributed.launch(args.config, args.overrides, stages[0].cfg)
    if code is not None:  # worker 0 has printed the run folder
        if code:
            raise SystemExit(code)
        return ""
    run_dir = run_stages(stages)
    return f"run folder: {run_dir}" if distributed.is_main_process() else ""


def _eval(args) -> str:
    from .config.loader import config_for_eval
    from .run.evaluate import evaluate_checkpoint

    if args.generate < 0:
        raise ConfigError(f"--generate must be 0 or more (prompts answered by each model), got {args.generate}")
    ref = args.ref
    if args.config and not ref:  # a config with stages: its last stage's reference, the stage before's result
        from .config.stages import load_stages
        from .run.stages import eval_reference

        ref = eval_reference(load_stages(args.config, args.overrides))
    cfg = config_for_eval(args.config, args.data, ref, args.overrides)
    return evaluate_checkpoint(cfg, args.model, args.generate)


def _report(args) -> str:
    from pathlib import Path

    from .run.compare import compare
    from .run.report import write_report

    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise ConfigError(f"{run_dir}: no metrics.jsonl here; give run folders")
    if len(args.run_dirs) == 1 and not args.out:
        return f"wrote {write_report(args.run_dirs[0])}"
    return f"wrote {compare(args.run_dirs, args.out or 'runs.html')}"


def _chat(args) -> str:
    from .run import chat

    logging.getLogger().setLevel(logging.WARNING)  # the terminal is the conversation's
    if (args.max_new_tokens < 1 or not 0 <= args.temperature < float("inf") or not 0 < args.top_p <= 1
            or not 0 <= args.seed < 2 ** 63):  # NaN fails every comparison
        raise ConfigError("--max-new-tokens must be at least 1, --temperature a finite number at least 0, --top-p in "
                          "(0, 1] and --seed in [0, 2^63)")
    if args.temperature == 0 and args.top_p < 1:
        raise ConfigError("--top-p samples, and --temperature 0 answers greedily; give a --temperature above 0")
    model, tokenizer, device = chat.load(chat.checkpoint_of(args.run) if args.run else args.model, args.device)
    sampling = chat.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    chat.session(model, tokenizer, device, sampling, args.system)
    return ""


def _export(args) -> str:
    from .run import chat
    from .run.export import export

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs each file it opens: the temporary one
    return export(chat.checkpoint_of(args.run) if args.run else args.model, args.gguf, args.type)


def _models(args) -> str:
    from .sources.builtin import BUILTINS, PREFIX, materialize

    return "\n".join(f"{PREFIX}{name}\t{materialize(PREFIX + name)}" for name in BUILTINS)


COMMANDS = {"run": _run, "eval": _eval, "report": _report, "models": _models, "chat": _chat, "export": _export}


def entry() -> None:
    """The `trinity` command (and `python -m trinity_dpo.cli`); a worker torchrun started runs `main` as it is."""
    from .engine.process_env import launched

    if launched():
        from .engine.distributed import worker_main

        _leave(worker_main(main))
    _leave(main(restart=True))


def _leave(code: int) -> NoReturn:
    """End the process with `code` once the command has returned, every file it wrote closed: the atexit handlers
    run (logging's flush among them), then the process exits without Python's teardown of module globals and of
    torch's, MKL's and oneDNN's static state, which took 0.8 s of a run's end (docs/benchmarks.md, History, seventh
    session). An exception never gets here: it leaves through Python's own exit, traceback first. `_run_exitfuncs`
    is CPython's (not a public API): where it is missing the process takes Python's own exit, teardown and all."""
    import atexit

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    run_exit_handlers()  # what interpreter shutdown would run first, in its order
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
