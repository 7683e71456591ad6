"""``python -m lce.eval.harness <lm-eval arguments>``: lm-eval's command line with lce's model registered.

lm-eval 0.4.13 finds models only in its registry, which holds its own models and whatever an imported module registered
(it reads no entry points for models), so its ``lm_eval`` command cannot see ``lce``. This wrapper imports
``lce.eval.harness.model`` (which registers ``LceLM`` as ``lce``) and lce's bundled tasks, then hands the arguments
to lm-eval's own command line unchanged:

    python -m lce.eval.harness --model lce --model_args pretrained=smollm2,posenc=yarn,factor=4 --tasks lce_demo_ppl

lce's configuration errors (an unknown key in ``--model_args``, an input longer than the patch supports) are printed
as one line, exit status 2, as by the ``lce`` command.
"""

from __future__ import annotations

import sys

from lce.errors import LceError


def main(argv: list[str] | None = None) -> None:
    from lce.eval.harness import cli_arguments, require_lm_eval

    try:
        require_lm_eval()
    except LceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    import lce.eval.harness.model  # noqa: F401  (registers "lce" in lm-eval's model registry)

    sys.argv[1:] = cli_arguments(list(sys.argv[1:] if argv is None else argv))
    try:
        cli_evaluate()
    except LceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
