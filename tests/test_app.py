"""app.py builds, and its Data handler reports a dataset through the backend."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "data"


def test_build_ui_and_data_handler():
    import app

    assert app.build_ui() is not None
    summary, sample = app.prepare_upload(str(FIXTURES / "alpaca.json"), "auto", "Be brief.", 1024)
    assert "alpaca" in summary and "3 rows" in summary and "[[Bonjour" in sample
    summary, _ = app.prepare_upload(str(FIXTURES / "alpaca.json"), "sharegpt", "Be brief.", 1024)
    assert summary.startswith("**Error:**")
