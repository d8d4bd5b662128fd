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
