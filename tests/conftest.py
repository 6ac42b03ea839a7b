import sys
from pathlib import Path

# Test helpers (direct forms, worker scripts) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

import locale  # noqa: E402

import pytest  # noqa: E402

_LOCALE_CATEGORIES = [getattr(locale, name) for name in ("LC_CTYPE", "LC_COLLATE", "LC_TIME", "LC_MONETARY",
                                                          "LC_MESSAGES", "LC_NUMERIC") if hasattr(locale, name)]


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """Give every test the process's locale back as it found it. GDCM's DICOM writer, which tests use to make
    series (helpers.write_dicom_series, sitk.WriteImage to .dcm), sets the C locale for the whole process; Python's
    default file encoding then becomes ASCII, and torch.compile, reading its UTF-8 templates later in the same run,
    fails. The product never writes DICOM."""
    saved = [(category, locale.setlocale(category)) for category in _LOCALE_CATEGORIES]
    yield
    for category, value in saved:
        if locale.setlocale(category) != value:
            locale.setlocale(category, value)
