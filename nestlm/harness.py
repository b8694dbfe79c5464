"""``nestlm harness ARGS...`` (or ``python -m nestlm.harness ARGS...``): lm-evaluation-harness's own
command line, every argument passed through, with the ``nestlm`` model backend registered first.

The harness finds model backends only in its own registry (no plugin discovery), so a plain
``lm_eval --model nestlm`` cannot work; this is that command with the backend added:

    nestlm harness --model nestlm --model_args path=DIR,budget=6b --tasks gsm8k --include_path TASKS
    nestlm harness ls tasks

One budget per run here; ``nestlm eval --budget all --tasks ...`` runs every budget from one load.
"""

from __future__ import annotations

import sys

from .errors import NestlmError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from .eval.harness import register

        register()
        from lm_eval.__main__ import cli_evaluate
    except NestlmError as e:
        print(f"nestlm: error: {e}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["nestlm harness", *argv]  # the harness's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except NestlmError as e:  # nestlm's own one-line errors (bad path, unknown budget, ...)
        print(f"nestlm: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
