"""Turn a lost peer (a rank that died or hangs) into one clear error instead of a hang or a trace."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

from moeify.errors import MoeifyError
from moeify.targets.distributed import comm

# gloo reports a dead peer as a plain RuntimeError ("Connection reset by peer", "Connection closed by
# peer", "Timed out waiting ..."); NCCL and the rendezvous store raise DistError subclasses.
_COMMUNICATION = re.compile(r"gloo|nccl|connection|timed out|timeout|socket|broken pipe", re.IGNORECASE)


class RankFailure(MoeifyError):
    """Another rank died, hung past the timeout, or the network failed: this rank cannot go on."""


class PeerRefused(MoeifyError):
    """Another rank refused its input (its files), so this one stops too: that rank's own error is the one to
    show, and launchers that collect the ranks' errors are not told this echo of it."""


def reason(error: BaseException) -> str:
    """The useful part of a backend message: no source path, first sentence only."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)  # "[.../pair.cc:537] "
    return text.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def communication(what: str) -> Iterator[None]:
    """Re-raise communication errors from the block as RankFailure naming what was under way."""
    try:
        yield
    except RankFailure:
        raise
    except (comm.DistError, RuntimeError) as e:
        if not isinstance(e, comm.DistError) and not _COMMUNICATION.search(str(e)):
            raise  # a bug, not a lost peer: keep its traceback
        raise RankFailure(f"{what}: lost contact with another rank ({reason(e)}); a rank died or hung, "
                          "so this run stops: see that rank's own error") from None
