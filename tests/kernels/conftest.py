"""Markers of the kernel tests (pytest.ini belongs to the whole project; these are local to tests/kernels)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "compile_all: every kernel variant compiled for sm_90 and sm_80 "
                                       "(runs with VILLE_COMPILE_ALL=1)")
