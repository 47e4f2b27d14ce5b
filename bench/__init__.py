"""bench/ is a package only so that pytest imports bench/conftest.py as `bench.conftest`: a second top-level
`conftest` module would replace tests/conftest.py's in sys.modules when both folders run in one pytest session,
and the test files that import from it would fail to collect. The scripts run as files (`python bench/x.py`)."""
