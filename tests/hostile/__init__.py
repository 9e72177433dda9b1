"""The hostile corpus of issue 11: crafted files and option values, and the runner that
plays them against every command that reads them (see corpus.py and runner.py)."""
