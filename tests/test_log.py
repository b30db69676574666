import logging

import pytest

from tumorseg.layouts import discover_cases
from tumorseg.log import LOGGER, say

from factory import write_case


@pytest.fixture
def logger_as_it_was():
    level, handlers, propagate = LOGGER.level, list(LOGGER.handlers), LOGGER.propagate
    yield LOGGER
    LOGGER.setLevel(level)
    LOGGER.handlers[:] = handlers
    LOGGER.propagate = propagate


def test_lines_go_to_stderr_as_they_are(capsys):
    say("note: a")
    say("warning: b")
    assert capsys.readouterr() == ("", "note: a\nwarning: b\n")  # no level or time: the command's lines


def test_a_program_quiets_the_notes_and_keeps_the_warnings(tmp_path, capsys, logger_as_it_was):
    write_case(tmp_path / "data", "BraTS20_Training_001")
    (tmp_path / "data" / "patient").mkdir()
    (tmp_path / "data" / "patient" / "3_t1_mprage_sag.nii.gz").write_bytes(b"")  # a note: a folder not read
    logging.getLogger("tumorseg").setLevel(logging.WARNING)
    assert len(discover_cases(tmp_path / "data")) == 1
    say("warning: kept")
    say("error: kept too")
    assert capsys.readouterr().err == "warning: kept\nerror: kept too\n"


def test_a_program_takes_the_lines_with_its_own_handlers(caplog, capsys, logger_as_it_was):
    LOGGER.handlers.clear()
    LOGGER.propagate = True
    with caplog.at_level(logging.INFO, logger="tumorseg"):
        say("note: a")
        say("warning: b")
        say("error: c")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "note: a"), (logging.WARNING, "warning: b"), (logging.ERROR, "error: c")]
    assert capsys.readouterr().err == ""  # once, through the program's handler
