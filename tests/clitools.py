"""Running the `moeify` CLI in-process, and what every bad-input case must look like."""
from click.testing import CliRunner

from moeify import cli


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def assert_user_error(result, tmp_path, message):
    """One line on stderr naming the problem, exit status 2, no output or temporary left behind."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def assert_fits(text, width=80):
    """Every printed line fits a standard terminal: rich wrapped or folded it instead of cutting it."""
    long = [line for line in text.splitlines() if len(line.rstrip()) > width]
    assert not long, "\n".join(long)
    assert "…" not in text, text


def unfolded(text):
    """The text with folded table cells joined again: a cell cut at the column edge continues on the
    next line in the same column, so joining all whitespace-separated pieces finds full values."""
    return "".join(text.split())
