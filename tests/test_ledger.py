"""The ledger of the paper's claims: verdicts recorded per setting, asserted only where the prose states them."""
from __future__ import annotations

import pytest

from satlib.report.ledger import CLAIMS, PAGE_WIDTH, Verdicts, read, setting_name


def test_a_verdict_is_stored_printed_within_the_page_and_read_back(tmp_path, capsys):
    Verdicts("quick", default=True, root=tmp_path).check(
        "theorem-2", "partly reproduced", measured="x " * 80, test="a test", expected="partly reproduced")
    printed = capsys.readouterr().out
    assert printed.startswith(CLAIMS["theorem-2"].where) and "partly reproduced" in printed
    assert max(len(line) for line in printed.splitlines()) <= PAGE_WIDTH
    found = read("quick", tmp_path).set_index("claim")
    assert found.loc["theorem-2", "status"] == "partly reproduced" and found["status"].isna().sum() == len(CLAIMS) - 1


def test_only_the_default_setting_asserts_the_expected_status(tmp_path):
    with pytest.raises(AssertionError, match="the text says 'reproduced'"):
        Verdicts("quick", default=True, root=tmp_path).check(
            "ib-minima", "not reproduced", measured="m", test="t", expected="reproduced")
    other = setting_name("quick", {"epochs": 40}, default=False)
    Verdicts(other, default=False, root=tmp_path).check(
        "ib-minima", "not reproduced", measured="m", test="t", expected="reproduced")
    assert read(other, tmp_path).set_index("claim").loc["ib-minima", "status"] == "not reproduced"
    assert other != "quick" and setting_name("quick", {}, default=True) == "quick"


def test_unknown_claims_and_statuses_are_refused(tmp_path):
    verdicts = Verdicts("quick", default=True, root=tmp_path)
    with pytest.raises(KeyError, match="unknown claim"):
        verdicts.check("no-such-claim", "reproduced", measured="m", test="t")
    with pytest.raises(ValueError, match="status must be one of"):
        verdicts.check("ib-minima", "proved", measured="m", test="t")
