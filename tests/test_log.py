import logging
import subprocess
import sys

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


def test_settings_made_before_the_import_stay_and_dict_config_drops_no_error(tmp_path):
    """A review's finds: a level set at the top of a script had been reset to INFO when tumorseg's
    logger was set up, and dictConfig after the import (disable_existing_loggers) had dropped every
    line, errors included."""
    code = ("import logging, logging.config\n"
            "logging.getLogger('tumorseg').setLevel(logging.WARNING)\n"
            "from tumorseg.log import say\n"
            "say('note: quiet')\n"
            "logging.config.dictConfig({'version': 1, 'root': {'level': 'INFO'}})\n"
            "say('error: kept')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "error: kept\n", proc.stderr
