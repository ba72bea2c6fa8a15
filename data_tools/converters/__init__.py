"""Annotation parsers of real datasets, one module per family; `data_tools.convert` writes their shards.

Each parser reads the official annotation files and returns `Output`s (a split name and its `Record`s); it never
touches the videos, so it stays cheap and testable. `FORMATS` maps the CLI's FORMAT names to parsers.
"""
from data_tools.converters import longcap, moments, msrvtt, webvid
from data_tools.converters.common import Output, Record

FORMATS = {
    "msrvtt": msrvtt.parse_msrvtt,
    "msrvtt_qa": msrvtt.parse_msrvtt_qa,
    "webvid": webvid.parse_webvid,
    "webvid_covr": webvid.parse_covr,
    "didemo": moments.parse_didemo,
    "activitynet": moments.parse_activitynet,
    "charades_sta": moments.parse_charades_sta,
    "qvhighlights": moments.parse_qvhighlights,
    "longcap": longcap.parse_longcap,
}

__all__ = ["FORMATS", "Output", "Record"]
