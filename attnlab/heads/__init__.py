"""The head catalog: typed, saved results of probes (``HeadScores``, ``TokenScores``) and run directories."""

from attnlab.heads.formats import format_head, parse_head
from attnlab.heads.results import HeadScores, TokenScores, load_result
from attnlab.heads.runs import Run

__all__ = ["HeadScores", "TokenScores", "Run", "load_result", "format_head", "parse_head"]
