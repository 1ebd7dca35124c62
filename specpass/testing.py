"""Helpers for users' test suites: fail a test when the graphs specpass compiles for a model change."""

from __future__ import annotations

import os

from torch import nn


def assert_graphs_match(model: nn.Module, snapshot_dir: str | os.PathLike[str], *, max_diff_lines: int = 400) -> None:
    """Raise AssertionError, with a diff per changed program naming the pass whose output changed first, when
    ``model``'s graphs differ from the snapshot in ``snapshot_dir`` (written by ``specpass graphs MODEL -o DIR``).

    The graphs are taken as the snapshot was (its plan, cache size and low-bit choices): nothing is timed or
    compiled, so the result is the same on any machine. Accept a change with
    ``specpass graphs MODEL --check DIR --update``.
    """
    from specpass import snapshot

    _, changes = snapshot.check(model, snapshot.read(snapshot_dir))
    if changes:
        raise AssertionError(
            f"the graphs specpass compiles differ from the snapshot {os.fspath(snapshot_dir)}:\n"
            + snapshot.render(changes, max_lines=max_diff_lines)
            + "\n(if the change is intended: specpass graphs MODEL --check DIR --update)"
        )
