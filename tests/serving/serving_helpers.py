"""Helpers of the serving tests: the CLI in-process, and one-line error checks."""


from typer.testing import CliRunner

from mtrec.cli import app

PREPROCESS = ["--labels", "click,like,share", "--user", "user_id", "--item", "item_id", "--time", "ts"]
TINY = ["--epochs", "1", "--batch-size", "512", "--embedding-dim", "4", "--expert-sizes", "16", "--tower-sizes", "8",
        "--experts", "2", "--device", "cpu", "--quiet", "--seed", "0"]


def invoke(*args):
    """Exit code and everything printed; a traceback is shown as such."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "Traceback: " + repr(result.exception)
    return result.exit_code, output


def ok(*args) -> str:
    code, out = invoke(*args)
    assert code == 0, out
    return out


def assert_user_error(code, output, *needles):
    """Exit code 2, no traceback, exactly one ``error:`` line, naming every needle."""
    errors = [line.lower() for line in output.splitlines() if line.startswith("error:")]
    assert (code, len(errors), "Traceback" in output) == (2, 1, False), output
    assert all(needle.lower() in errors[0] for needle in needles), (needles, errors[0])
