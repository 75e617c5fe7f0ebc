"""Each warning once per run, with a count of the repeats at the end."""

import warnings

from stepscope.warnings_once import WarningTally, once_per_run

NO_SUMMARY = "the response has no summary: no answer line and a single paragraph"


def test_the_first_occurrence_is_shown_and_repeats_are_counted_at_the_end():
    shown: list[str] = []
    with once_per_run(shown.append) as tally:
        for _ in range(37):
            warnings.warn(NO_SUMMARY)
        warnings.warn("max_new_tokens cut to 12")
        warnings.warn("max_new_tokens cut to 12")
        warnings.warn("a single odd thing")
        assert shown == [f"warning: {NO_SUMMARY}", "warning: max_new_tokens cut to 12",
                         "warning: a single odd thing"]  # nothing repeated while the run goes on
    assert tally.total == 40
    assert shown[3:] == ["warning: 37 responses have no summary (no answer line and a single paragraph)",
                         "warning: max_new_tokens cut to 12 (2 times)"]


def test_warnings_from_different_places_with_the_same_text_count_together():
    shown: list[str] = []

    def elsewhere():
        warnings.warn(NO_SUMMARY)

    with once_per_run(shown.append):
        warnings.warn(NO_SUMMARY)
        elsewhere()
        elsewhere()
    assert shown == [f"warning: {NO_SUMMARY}",
                     "warning: 3 responses have no summary (no answer line and a single paragraph)"]


def test_trace_warnings_reach_the_tally_once_per_trace(tokenizers):
    from stepscope import Trace

    shown: list[str] = []
    with once_per_run(shown.append) as tally:
        for _ in range(3):
            Trace.from_text(tokenizers["plain"], "What is 2 plus 3?", "It is five and that is all there is")
    assert sum(tally.counts.values()) == 3 and len(tally.counts) == 1
    assert shown[0].startswith("warning: the response has no summary")
    assert shown[-1].startswith("warning: 3 responses have no summary (")


def test_filters_and_the_display_hook_are_restored():
    before_filters, before_hook = list(warnings.filters), warnings.showwarning
    with once_per_run(lambda line: None):
        warnings.warn("inside")
    assert warnings.filters == before_filters and warnings.showwarning is before_hook


def test_ignored_categories_stay_ignored():
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with once_per_run(shown.append):
            warnings.warn("old api", DeprecationWarning)
            warnings.warn("kept")
    assert shown == ["warning: kept"]


def test_multi_line_messages_become_one_line():
    tally = WarningTally(emit=lambda line: None)
    assert tally.record("two\n  lines") and not tally.record("two lines")
    assert tally.repeated() == ["warning: two lines (2 times)"]
